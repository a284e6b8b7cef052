"""Submit the compiled pipeline to Vertex AI Pipelines or to a Kubeflow Pipelines cluster.

One run, or a schedule of runs (a Vertex schedule or a KFP recurring run) from the same package.
Everything that can be checked before talking to a server is checked here, and fails with a
`SubmitError` that names the argument at fault. The client libraries are imported on first use,
so `python -m pipeline compile` does not pay for them.

Caching is off for every submission: each run must really execute its steps, so DP noise is fresh
and the privacy ledger records the DP events of this run, never those of a cached earlier one.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

__all__ = ["SubmitError", "validate_cron", "kfp_cron", "submit_vertex", "submit_kfp"]


class SubmitError(ValueError):
    """A submission that cannot be sent as asked (bad argument, unreadable package, rejected spec)."""


# ---------------------------------------------------------------------------------------------
# cron
# ---------------------------------------------------------------------------------------------

_CRON_FORMAT = ("5 space-separated fields 'minute hour day-of-month month day-of-week', "
                "e.g. '0 3 * * 1' (03:00 every Monday), optionally prefixed by 'CRON_TZ=<IANA zone> '")
_MONTHS = {m: i + 1 for i, m in enumerate(
    ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"])}
_DAYS = {d: i for i, d in enumerate(["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"])}
# (name, low, high, names). Day of week stops at 6 (0 is Sunday): unix cron also reads 7 as Sunday,
# but KFP's parser (robfig/cron) does not, and one expression has to mean the same on both backends.
_FIELDS = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day-of-month", 1, 31, {}),
    ("month", 1, 12, _MONTHS),
    ("day-of-week", 0, 6, _DAYS),
)
_TZ_PREFIX = re.compile(r"^(?:CRON_)?TZ=([A-Za-z0-9_+\-]+(?:/[A-Za-z0-9_+\-]+)*)$")


def _cron_error(expr: str, why: str) -> SubmitError:
    return SubmitError(f"schedule: invalid cron expression {expr!r}: {why}; expected {_CRON_FORMAT}")


def _cron_value(token: str, name: str, low: int, high: int, names: dict, expr: str) -> int:
    if token.isdigit():
        value = int(token)
    elif token.upper() in names:
        value = names[token.upper()]
    else:
        raise _cron_error(expr, f"{name} field has {token!r}, not a number"
                          + (f" or a name ({', '.join(names)})" if names else ""))
    if not low <= value <= high:
        hint = " (0 is Sunday)" if name == "day-of-week" else ""
        raise _cron_error(expr, f"{name} value {value} is outside {low}-{high}{hint}")
    return value


def _check_cron_field(field: str, name: str, low: int, high: int, names: dict, expr: str) -> None:
    for item in field.split(","):
        base, slash, step = item.partition("/")
        if slash and not (step.isdigit() and int(step) >= 1):
            raise _cron_error(expr, f"{name} field has step {step!r}, not a positive integer")
        if base == "*":
            continue
        first, dash, last = base.partition("-")
        a = _cron_value(first, name, low, high, names, expr)  # 'a', or 'a/n': from a on, every n
        if dash and a > _cron_value(last, name, low, high, names, expr):
            raise _cron_error(expr, f"{name} range {base!r} runs backwards")


def validate_cron(expr: str) -> str:
    """Checks a 5-field unix cron expression and returns it with single spaces.

    The form accepted is the one both backends read the same way: numbers, '*', ranges 'a-b',
    lists 'a,b', steps '*/n' or 'a-b/n', month and weekday names (JAN, MON); an optional leading
    'CRON_TZ=Europe/Berlin ' (or 'TZ=...') time zone, which Vertex AI schedules understand.
    """
    if not isinstance(expr, str) or not expr.strip():
        raise SubmitError(f"schedule: empty cron expression; expected {_CRON_FORMAT}")
    parts = expr.split()
    tz = []
    if parts and "=" in parts[0]:
        if not _TZ_PREFIX.match(parts[0]):
            raise _cron_error(expr, f"{parts[0]!r} is not a time zone prefix like 'CRON_TZ=Europe/Berlin'")
        tz, parts = [parts[0]], parts[1:]
    if len(parts) != 5:
        raise _cron_error(expr, f"it has {len(parts)} fields, not 5"
                          + (" (KFP's 6-field form with seconds is derived from the 5-field one, "
                             "do not pass it)" if len(parts) == 6 else ""))
    for field, (name, low, high, names) in zip(parts, _FIELDS):
        _check_cron_field(field, name, low, high, names, expr)
    return " ".join(tz + parts)


def kfp_cron(expr: str) -> str:
    """The 6-field form (seconds first) that KFP recurring runs want, from a 5-field cron."""
    cron = validate_cron(expr)
    if "=" in cron.split()[0]:
        raise SubmitError(f"schedule: {expr!r} has a time zone prefix, which KFP recurring runs do not "
                          "take (they run in the cluster's time zone); drop the prefix and shift the hours")
    return "0 " + cron


# ---------------------------------------------------------------------------------------------
# shared checks
# ---------------------------------------------------------------------------------------------

def _load_package(package_path: str) -> dict:
    """Reads the compiled pipeline spec (YAML or JSON); the first document is the PipelineSpec."""
    import yaml

    if not package_path or not os.path.isfile(package_path):
        raise SubmitError(f"package_path: no pipeline package at {package_path!r}; "
                          "compile one first with `python -m pipeline compile` (or `make compile`)")
    try:
        with open(package_path, encoding="utf-8") as f:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise SubmitError(f"package_path: {package_path!r} is not a readable YAML/JSON pipeline package: {e}") from e
    spec = docs[0] if docs else None
    if isinstance(spec, dict) and "pipelineSpec" in spec:  # a PipelineJob JSON wrapping the spec
        spec = spec["pipelineSpec"]
    if not isinstance(spec, dict) or "pipelineInfo" not in spec or "root" not in spec:
        raise SubmitError(f"package_path: {package_path!r} is not a compiled KFP pipeline "
                          "(no pipelineInfo/root); compile it with kfp.compiler.Compiler")
    return spec


def _check_parameters(spec: dict, parameters: Any, package_path: str) -> dict:
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, Mapping) or not all(isinstance(k, str) for k in parameters):
        raise SubmitError(f"parameters: expected a mapping of parameter name to value, got {type(parameters).__name__}")
    declared = (spec.get("root", {}).get("inputDefinitions", {}) or {}).get("parameters", {}) or {}
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise SubmitError(f"parameters: {', '.join(unknown)} not declared by the pipeline in {package_path!r}; "
                          f"it takes: {', '.join(sorted(declared)) or '(none)'}")
    missing = sorted(n for n, d in declared.items()
                     if n not in parameters and not d.get("isOptional") and "defaultValue" not in d)
    if missing:
        raise SubmitError(f"parameters: the pipeline requires {', '.join(missing)}, which have no default")
    for name, value in parameters.items():
        kind = declared[name].get("parameterType")
        accepts = _PARAMETER_TYPES.get(kind)
        if accepts is not None and not accepts(value):
            raise SubmitError(f"parameters: {name}={value!r} is a {type(value).__name__}, "
                              f"the pipeline declares it {kind}")
    return dict(parameters)


_PARAMETER_TYPES = {  # KFP IR parameter types -> the Python values that serialize to them
    "NUMBER_INTEGER": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "NUMBER_DOUBLE": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "STRING": lambda v: isinstance(v, str),
    "BOOLEAN": lambda v: isinstance(v, bool),
    "STRUCT": lambda v: isinstance(v, Mapping),
    "LIST": lambda v: isinstance(v, (list, tuple)),
}


def _require(value: Any, name: str, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SubmitError(f"{name}: required, expected {what}")
    if any(c.isspace() for c in value):
        raise SubmitError(f"{name}: {value!r} contains whitespace; expected {what}")
    return value


_GCS_ROOT = re.compile(r"^gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9](/.*)?$")
_LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")


def _check_labels(labels: Any) -> dict | None:
    """Google Cloud label rules: lowercase keys starting with a letter; values and keys <= 63 chars."""
    if labels is None:
        return None
    if not isinstance(labels, Mapping):
        raise SubmitError(f"labels: expected a mapping of label name to value, got {type(labels).__name__}")
    for k, v in labels.items():
        if not (isinstance(k, str) and _LABEL_KEY.match(k)):
            raise SubmitError(f"labels: key {k!r} is not a Google Cloud label key "
                              "(lowercase letters, digits, '_' or '-', starting with a letter, <= 63 chars)")
        if not (isinstance(v, str) and _LABEL_VALUE.match(v)):
            raise SubmitError(f"labels: value {v!r} of {k!r} is not a Google Cloud label value "
                              "(lowercase letters, digits, '_' or '-', <= 63 chars)")
    if len(labels) > 64:
        raise SubmitError(f"labels: {len(labels)} labels, Google Cloud allows at most 64")
    return dict(labels) or None


# ---------------------------------------------------------------------------------------------
# Vertex AI Pipelines
# ---------------------------------------------------------------------------------------------

def submit_vertex(package_path: str, *, project: str, region: str, pipeline_root: str,
                  parameters: dict, display_name: str = "dpfedemb", schedule: str | None = None,
                  service_account: str | None = None, credentials=None, labels: dict | None = None,
                  api_transport: str = "rest") -> dict:
    """Creates a Vertex AI PipelineJob from the package, or a Vertex schedule when `schedule` is a cron.

    `credentials` are google.auth credentials (default: Application Default Credentials).
    `api_transport` is the SDK's transport; REST by default, which is also what the tests exercise.
    Returns {"backend": "vertex", "kind": "run" | "schedule", "resource_name": ..., ...}.
    """
    _require(project, "project", "a Google Cloud project id such as 'my-project'")
    if "/" in project:
        raise SubmitError(f"project: {project!r} looks like a resource path; expected a bare project id")
    _require(region, "region", "a Vertex AI region such as 'us-central1'")
    _require(pipeline_root, "pipeline_root", "a Cloud Storage folder 'gs://bucket/path'")
    if not _GCS_ROOT.match(pipeline_root):
        raise SubmitError(f"pipeline_root: {pipeline_root!r} is not a Cloud Storage path; Vertex AI Pipelines "
                          "writes artifacts to 'gs://bucket/path'")
    _require(display_name, "display_name", "a non-empty name")
    cron = validate_cron(schedule) if schedule is not None else None
    labels = _check_labels(labels)
    if service_account is not None:
        _require(service_account, "service_account", "a service account e-mail")
    spec = _load_package(package_path)
    params = _check_parameters(spec, parameters, package_path)

    from google.cloud import aiplatform

    try:
        aiplatform.init(project=project, location=region, credentials=credentials,
                        api_transport=api_transport)
        job = aiplatform.PipelineJob(
            display_name=display_name,
            template_path=package_path,
            pipeline_root=pipeline_root,
            parameter_values=params,
            enable_caching=False,
            labels=labels,
        )
    except ValueError as e:  # the SDK's own checks: region, parameter types, job id
        raise SubmitError(f"Vertex AI rejected the submission before sending it: {e}") from e

    out = {"backend": "vertex", "project": project, "region": region, "pipeline_root": pipeline_root,
           "display_name": display_name, "parameters": params}
    if cron is None:
        job.submit(service_account=service_account)
        return {**out, "kind": "run", "resource_name": job.resource_name, "job_id": job.job_id}
    sched = job.create_schedule(cron=cron, display_name=display_name, service_account=service_account)
    return {**out, "kind": "schedule", "resource_name": sched.resource_name, "cron": cron}


# ---------------------------------------------------------------------------------------------
# Kubeflow Pipelines
# ---------------------------------------------------------------------------------------------

def submit_kfp(package_path: str, *, host: str, parameters: dict, experiment: str = "dpfedemb",
               run_name: str | None = None, schedule: str | None = None, client=None) -> dict:
    """Creates a KFP run from the package, or a recurring run when `schedule` is a (5-field) cron.

    `client` is an already configured kfp.Client (auth, namespace); by default kfp.Client(host=host).
    Returns {"backend": "kfp", "kind": "run" | "schedule", "resource_name": <run or recurring run id>, ...}.
    """
    _require(host, "host", "the KFP API endpoint 'http(s)://host[:port]'")
    if not re.match(r"^https?://[^/\s]+", host):
        raise SubmitError(f"host: {host!r} is not an http:// or https:// URL of the KFP API endpoint")
    if not isinstance(experiment, str) or not experiment.strip():
        raise SubmitError("experiment: required, expected a non-empty experiment name")
    if run_name is not None and (not isinstance(run_name, str) or not run_name.strip()):
        raise SubmitError("run_name: expected a non-empty name, or None for a generated one")
    cron6 = kfp_cron(schedule) if schedule is not None else None
    spec = _load_package(package_path)
    params = _check_parameters(spec, parameters, package_path)

    out = {"backend": "kfp", "host": host, "experiment": experiment, "parameters": params}
    # kfp.Client prints links ("Experiment details: ...") to stdout: send them to stderr, so that the
    # CLI's stdout carries only its own result.
    with contextlib.redirect_stdout(sys.stderr):
        if client is None:
            import kfp

            client = kfp.Client(host=host.rstrip("/"))
        if cron6 is None:
            result = client.create_run_from_pipeline_package(
                package_path, arguments=params, run_name=run_name, experiment_name=experiment,
                enable_caching=False)
            exp_id = getattr(result.run_info, "experiment_id", None)
            return {**out, "kind": "run", "resource_name": result.run_id, "run_id": result.run_id,
                    "experiment_id": exp_id, "url": f"{host.rstrip('/')}/#/runs/details/{result.run_id}"}
        exp = client.create_experiment(name=experiment)  # gets the experiment when it exists
        job_name = run_name or f"{spec['pipelineInfo'].get('name', 'dpfedemb')}-recurring"
        rr = client.create_recurring_run(
            experiment_id=exp.experiment_id, job_name=job_name, cron_expression=cron6,
            pipeline_package_path=package_path, params=params, enable_caching=False)
    return {**out, "kind": "schedule", "resource_name": rr.recurring_run_id,
            "recurring_run_id": rr.recurring_run_id, "experiment_id": exp.experiment_id,
            "job_name": job_name, "cron": cron6,
            "url": f"{host.rstrip('/')}/#/recurringrun/details/{rr.recurring_run_id}"}
