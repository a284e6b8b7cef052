"""CLI: ``python -m pipeline {compile,run,submit,audit}``.

- ``compile [--check]``: write pipeline.yaml from pipeline/ (``--check`` fails when it is stale).
- ``run``: the whole DAG locally (kfp.local SubprocessRunner in this environment, Beam in-process,
  local paths), the default data imported when missing, outputs in ``runs/<time>/``.
- ``submit --backend vertex|kfp ...``: the compiled pipeline to Vertex AI or Kubeflow, once or on
  a cron schedule.
- ``audit RUN``: the lineage of a run, read back from its artifacts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from typing import Any, Optional, Sequence

from dpfedemb.config import ConfigError, PipelineParams

log = logging.getLogger("pipeline")


def _param_value(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--param {text!r}: expected NAME=VALUE")
    name, value = text.split("=", 1)
    fields = {f.name: f.type for f in dataclasses.fields(PipelineParams)}
    if name not in fields:
        raise argparse.ArgumentTypeError(f"--param {name}: unknown parameter; known: "
                                         f"{sorted(fields)}")
    kind = {"int": int, "float": float, "str": str}[fields[name]]
    try:
        return name, kind(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--param {name}={value!r}: expected {fields[name]}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="compile pipeline.yaml")
    c.add_argument("--output", default="pipeline.yaml")
    c.add_argument("--check", action="store_true", help="fail if the file is not up to date")
    r = sub.add_parser("run", help="run the whole pipeline locally")
    r.add_argument("--data-dir", default="data/fashion-mnist",
                   help="imported data set (imported from --fashion-mnist-dir when missing)")
    r.add_argument("--fashion-mnist-dir", default="/usr/share/datasets/fashion-mnist")
    r.add_argument("--runs-dir", default="runs")
    r.add_argument("--param", action="append", type=_param_value, default=[],
                   metavar="NAME=VALUE", help="override a pipeline parameter (repeatable)")
    s = sub.add_parser("submit", help="submit to Vertex AI Pipelines or Kubeflow Pipelines")
    s.add_argument("--backend", choices=["vertex", "kfp"], required=True)
    s.add_argument("--package", default="pipeline.yaml")
    s.add_argument("--data-dir", required=True, help="gs:// folder of the imported data set")
    s.add_argument("--pseudonym-key-file", default="",
                   help="gs:// object holding the pseudonym key (restricted by IAM)")
    s.add_argument("--param", action="append", type=_param_value, default=[], metavar="NAME=VALUE")
    s.add_argument("--schedule", default=None, help="cron (5 fields) for recurring runs")
    s.add_argument("--project")
    s.add_argument("--region")
    s.add_argument("--pipeline-root")
    s.add_argument("--service-account")
    s.add_argument("--host", help="Kubeflow Pipelines endpoint (kfp backend)")
    s.add_argument("--experiment", default="dpfedemb")
    a = sub.add_parser("audit", help="lineage of a local run, read from its artifacts")
    a.add_argument("run", help="runs/<time> folder of `python -m pipeline run`")
    a.add_argument("--json", action="store_true", help="print JSON instead of text")
    return p


def _params(overrides: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    params = dataclasses.asdict(PipelineParams(**dict(overrides)))  # validates every value
    return params


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", force=True)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "compile":
            from pipeline import compile as compile_lib
            return compile_lib.main(args.output, check=args.check)
        if args.command == "run":
            from pipeline import local_run
            summary = local_run.run(args.data_dir, args.fashion_mnist_dir, args.runs_dir,
                                    _params(args.param))
            print(local_run.format_summary(summary))
            return 0
        if args.command == "submit":
            from pipeline import submit
            params = {"data_dir": args.data_dir, "pseudonym_key_file": args.pseudonym_key_file,
                      **_params(args.param)}
            if args.backend == "vertex":
                out = submit.submit_vertex(args.package, project=args.project or "",
                                           region=args.region or "",
                                           pipeline_root=args.pipeline_root or "",
                                           parameters=params, schedule=args.schedule,
                                           service_account=args.service_account)
            else:
                out = submit.submit_kfp(args.package, host=args.host or "", parameters=params,
                                        experiment=args.experiment, schedule=args.schedule)
            print(json.dumps(out, indent=2, default=str))
            return 0
        from pipeline import audit
        report = audit.audit(args.run)
        print(json.dumps(report, indent=2) if args.json else audit.format_audit(report))
        return 0 if report["consistent"] else 1
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
