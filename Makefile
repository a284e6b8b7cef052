# The front door. Every target bootstraps .venv from the pinned requirements when it is missing or stale.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist

.PHONY: run test compile images bench venv system-deps clean

$(STAMP): requirements.txt requirements-nodeps.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 (TFF and TF 2.14 need < 3.12)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip==24.3.1"
	$(PY) -m pip install --quiet -r requirements.txt
	# TFF pins jaxlib==0.4.14, which PyPI no longer has: install it without deps (README, "Why these pins").
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

# The default data: Fashion-MNIST from Debian's package (IDX files).
system-deps:
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST not found in $(FMNIST_DIR): installing Debian package dataset-fashion-mnist"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  ( $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq dataset-fashion-mnist ) \
	  || { echo "error: could not install dataset-fashion-mnist. Install it by hand (apt-get install dataset-fashion-mnist)"; \
	       echo "or set FMNIST_DIR to a folder holding the four Fashion-MNIST IDX .gz files."; exit 1; }; \
	fi

run: $(STAMP) system-deps
	$(PY) -m pipeline run --fashion-mnist-dir $(FMNIST_DIR)

test: $(STAMP)
	$(PY) -m pytest -q tests

compile: $(STAMP)
	$(PY) -m pipeline compile

bench: $(STAMP) system-deps
	$(PY) -m bench.all --fashion-mnist-dir $(FMNIST_DIR)

images:
	docker build -f containers/Dockerfile.cpu -t dpfedemb-cpu:latest .
	docker build -f containers/Dockerfile.gpu -t dpfedemb-gpu:latest .

clean:
	rm -rf $(VENV) runs
