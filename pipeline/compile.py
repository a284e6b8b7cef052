"""Compile the DAG to pipeline.yaml, or check that the checked-in file is up to date."""
from __future__ import annotations

import os
import sys
import tempfile

from kfp import compiler

from pipeline import dag


def compile_to(path: str, accelerator: str = dag.DEFAULT_ACCELERATOR) -> None:
    compiler.Compiler().compile(dag.build_pipeline(accelerator), path)


def main(output: str = "pipeline.yaml", check: bool = False) -> int:
    if not check:
        compile_to(output)
        print(f"wrote {output}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = os.path.join(tmp, "pipeline.yaml")
        compile_to(fresh)
        current = open(output).read() if os.path.exists(output) else ""
        if open(fresh).read() != current:
            print(f"{output} is stale: run `python -m pipeline compile` (or make compile) and "
                  "commit it", file=sys.stderr)
            return 1
    print(f"{output} is up to date")
    return 0
