"""One KFP component per pipeline step, each a thin wrapper over dpfedemb.

Component functions are plain Python functions with KFP artifact annotations; :func:`build`
turns them into KFP components for given container images (the image names are compile options,
since they differ between registries), so the same code serves kfp.local, Kubeflow and Vertex.
"""
from __future__ import annotations

import types

from kfp import dsl

from components import evaluate, finetune, partition_users, pretrain_public, train_dp_federated
from components import validate_parameters

CPU_IMAGE = "dpfedemb-cpu:latest"
GPU_IMAGE = "dpfedemb-gpu:latest"


def build(cpu_image: str = CPU_IMAGE, gpu_image: str = GPU_IMAGE) -> types.SimpleNamespace:
    """The KFP components, in images that have dpfedemb installed (no pip install at run time)."""
    def comp(fn, image: str):  # type: ignore[no-untyped-def]
        return dsl.component(fn, base_image=image, install_kfp_package=False)
    return types.SimpleNamespace(
        validate_parameters=comp(validate_parameters.validate_parameters, cpu_image),
        partition_users=comp(partition_users.partition_users, cpu_image),
        pretrain_public=comp(pretrain_public.pretrain_public, cpu_image),
        train_dp_federated=comp(train_dp_federated.train_dp_federated, gpu_image),
        finetune=comp(finetune.finetune, gpu_image),
        evaluate=comp(evaluate.evaluate, cpu_image),
    )
