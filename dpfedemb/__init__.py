"""dpfedemb: image-embedding models trained with user-level differential privacy (DP-FedEmb)."""
import os

# TensorFlow's C++ start-up chatter (CUDA probes, CPU features) drowns the progress lines;
# an operator can still set TF_CPP_MIN_LOG_LEVEL=0.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
