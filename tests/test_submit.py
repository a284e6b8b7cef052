"""pipeline.submit: what would be sent to Vertex AI and to KFP, with no network.

The real client libraries run (kfp.Client -> kfp_server_api -> urllib3; aiplatform REST transport and
google-cloud-storage -> requests -> urllib3); only urllib3's connection pool is replaced, by a fake
server that records every request and answers with canned JSON. Both stacks reach the network through
`urllib3.connectionpool.HTTPConnectionPool.urlopen`, so one fake sees everything, and a request to any
host the test does not expect fails the test instead of leaving the machine.
"""
# No `from __future__ import annotations`: kfp reads the component's annotations as real types.
import io
import json
import re
from urllib.parse import parse_qs, urlsplit

import pytest
import urllib3
from urllib3.connectionpool import HTTPConnectionPool

from pipeline.submit import SubmitError, kfp_cron, submit_kfp, submit_vertex, validate_cron

KFP_HOST = "http://kfp.example.test:8888"
PARAMS = {"data_root": "gs://dp-data/records", "rounds": 7, "note": "weekly retrain"}


# ----------------------------------------------------------------------------------------------
# a tiny real pipeline package
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def package(tmp_path_factory) -> str:
    from kfp import compiler, dsl

    @dsl.component(base_image="python:3.11-slim")
    def step(data_root: str, rounds: int, note: str) -> str:
        return f"{data_root}:{rounds}:{note}"

    @dsl.pipeline(name="tiny-dp", description="test pipeline")
    def tiny(data_root: str, rounds: int = 2, note: str = "none"):
        step(data_root=data_root, rounds=rounds, note=note)

    path = tmp_path_factory.mktemp("pkg") / "p.yaml"
    compiler.Compiler().compile(pipeline_func=tiny, package_path=str(path))
    return str(path)


# ----------------------------------------------------------------------------------------------
# the fake server under urllib3
# ----------------------------------------------------------------------------------------------

class FakeServer:
    """Routes (method, url regex) -> handler(request) -> (status, json); records every request."""

    def __init__(self, hosts: set[str]):
        self.hosts = hosts
        self.routes: list[tuple[str, re.Pattern, object]] = []
        self.requests: list[dict] = []

    def route(self, method: str, pattern: str, handler):
        self.routes.append((method, re.compile(pattern), handler))

    def find(self, method: str, pattern: str) -> list[dict]:
        rx = re.compile(pattern)
        return [r for r in self.requests if r["method"] == method and rx.search(r["path"])]

    def urlopen(self, pool, method, url, body=None, headers=None, **kw):
        if not url.startswith(("http://", "https://")):
            default = {"http": 80, "https": 443}[pool.scheme]
            port = f":{pool.port}" if pool.port and pool.port != default else ""
            url = f"{pool.scheme}://{pool.host}{port}{url}"
        parts = urlsplit(url)
        if isinstance(body, str):
            body = body.encode()
        try:
            payload = json.loads(body) if body else None
        except ValueError:
            payload = body
        req = {"method": method, "url": url, "host": parts.netloc, "path": parts.path,
               "query": parse_qs(parts.query), "headers": dict(headers or {}), "json": payload}
        self.requests.append(req)
        if parts.netloc not in self.hosts:
            raise AssertionError(f"request to unexpected host {parts.netloc}: {method} {url}")
        for m, rx, handler in self.routes:
            if m == method and rx.search(parts.path):
                status, answer = handler(req)
                break
        else:
            status, answer = 404, {"error": {"code": 404, "message": f"no fake route for {method} {parts.path}"}}
        data = json.dumps(answer).encode()
        return urllib3.HTTPResponse(
            body=io.BytesIO(data), headers={"Content-Type": "application/json", "Content-Length": str(len(data))},
            status=status, reason="OK" if status < 400 else "Error", request_method=method, request_url=url,
            preload_content=kw.get("preload_content", True), decode_content=kw.get("decode_content", True))


@pytest.fixture
def fake_http(monkeypatch):
    def install(hosts: set[str]) -> FakeServer:
        server = FakeServer(hosts)
        monkeypatch.setattr(HTTPConnectionPool, "urlopen",
                            lambda pool, method, url, *a, **kw: server.urlopen(pool, method, url, *a, **kw))
        return server
    return install


# ----------------------------------------------------------------------------------------------
# KFP
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def kfp_server(fake_http, monkeypatch, tmp_path):
    import kfp.client.client as kfp_client_mod

    # No local KFP context (namespace, cookies) and no KF_PIPELINES_* overrides leak into the test.
    monkeypatch.setattr(kfp_client_mod.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    for var in ("KF_PIPELINES_ENDPOINT", "KF_PIPELINES_UI_ENDPOINT", "KF_PIPELINES_DEFAULT_EXPERIMENT_NAME",
                "KF_PIPELINES_OVERRIDE_EXPERIMENT_NAME", "KF_PIPELINES_IAP_OAUTH2_CLIENT_ID",
                "KF_PIPELINES_APP_OAUTH2_CLIENT_ID", "KF_PIPELINES_APP_OAUTH2_CLIENT_SECRET"):
        monkeypatch.delenv(var, raising=False)

    server = fake_http({"kfp.example.test:8888"})
    experiments: list[dict] = []

    def list_experiments(req):
        flt = json.loads(req["query"]["filter"][0])
        name = flt["predicates"][0]["stringValue"]
        found = [e for e in experiments if e["display_name"] == name]
        return 200, ({"experiments": found, "total_size": len(found)} if found else {})

    def create_experiment(req):
        exp = {"experiment_id": f"exp-{len(experiments) + 1}", "display_name": req["json"]["display_name"]}
        experiments.append(exp)
        return 200, exp

    def create_run(req):
        return 200, {**req["json"], "run_id": "run-123", "state": "PENDING"}

    def create_recurring(req):
        return 200, {**req["json"], "recurring_run_id": "rr-456", "status": "ENABLED"}

    server.route("GET", r"^/apis/v2beta1/healthz$", lambda req: (200, {"multi_user": False}))
    server.route("GET", r"^/apis/v2beta1/experiments$", list_experiments)
    server.route("POST", r"^/apis/v2beta1/experiments$", create_experiment)
    server.route("POST", r"^/apis/v2beta1/runs$", create_run)
    server.route("POST", r"^/apis/v2beta1/recurringruns$", create_recurring)
    return server


def test_kfp_run_sends_spec_and_parameters(kfp_server, package, capsys):
    out = submit_kfp(package, host=KFP_HOST, parameters=PARAMS, experiment="dp-exp", run_name="nightly")
    printed = capsys.readouterr()
    assert "Run details" in printed.err and printed.out == ""  # kfp's links go to stderr, not stdout

    runs = kfp_server.find("POST", r"/runs$")
    assert len(runs) == 1
    body = runs[0]["json"]
    assert runs[0]["url"] == f"{KFP_HOST}/apis/v2beta1/runs"
    assert body["display_name"] == "nightly"
    assert body["experiment_id"] == "exp-1"
    assert body["runtime_config"]["parameters"] == PARAMS
    spec = body["pipeline_spec"]
    assert spec["pipelineInfo"]["name"] == "tiny-dp"
    assert set(spec["root"]["inputDefinitions"]["parameters"]) == {"data_root", "rounds", "note"}
    # Caching is forced off at submission: every task says so explicitly.
    assert all(t["cachingOptions"].get("enableCache", False) is False
               for t in spec["root"]["dag"]["tasks"].values())
    # The experiment was looked up by name, then created.
    assert [r["method"] for r in kfp_server.find(r"GET", r"/experiments$")] == ["GET"]
    assert kfp_server.find("POST", r"/experiments$")[0]["json"]["display_name"] == "dp-exp"
    assert out["kind"] == "run" and out["backend"] == "kfp"
    assert out["run_id"] == out["resource_name"] == "run-123"
    assert out["experiment_id"] == "exp-1"
    assert out["url"] == f"{KFP_HOST}/#/runs/details/run-123"
    assert {r["host"] for r in kfp_server.requests} == {"kfp.example.test:8888"}


def test_kfp_recurring_run_gets_six_field_cron(kfp_server, package):
    submit_kfp(package, host=KFP_HOST, parameters=PARAMS, experiment="dp-exp")  # creates the experiment
    out = submit_kfp(package, host=KFP_HOST + "/", parameters=PARAMS, experiment="dp-exp",
                     schedule="30 2 * * MON")

    assert len(kfp_server.find("POST", r"/experiments$")) == 1  # the second call reused it
    recurring = kfp_server.find("POST", r"/recurringruns$")
    assert len(recurring) == 1
    body = recurring[0]["json"]
    assert body["trigger"]["cron_schedule"]["cron"] == "0 30 2 * * MON"
    assert body["experiment_id"] == "exp-1"
    assert body["display_name"] == "tiny-dp-recurring"
    assert body["mode"] == "ENABLE"
    assert body["runtime_config"]["parameters"] == PARAMS
    assert body["pipeline_spec"]["pipelineInfo"]["name"] == "tiny-dp"
    assert out == {**out, "kind": "schedule", "resource_name": "rr-456", "cron": "0 30 2 * * MON",
                   "experiment_id": "exp-1"}


def test_kfp_uses_given_client_without_constructing_one(package):
    calls = []

    class Client:
        def create_run_from_pipeline_package(self, path, **kw):
            calls.append((path, kw))
            return type("R", (), {"run_id": "r1", "run_info": type("I", (), {"experiment_id": "e1"})()})()

    out = submit_kfp(package, host="https://kfp.internal", parameters={"data_root": "/d"}, client=Client())
    assert calls == [(package, {"arguments": {"data_root": "/d"}, "run_name": None,
                                "experiment_name": "dpfedemb", "enable_caching": False})]
    assert out["run_id"] == "r1"


# ----------------------------------------------------------------------------------------------
# Vertex AI
# ----------------------------------------------------------------------------------------------

VERTEX_HOST = "us-central1-aiplatform.googleapis.com"
ROOT = "gs://dp-artifacts/pipeline-root"


@pytest.fixture
def vertex_server(fake_http):
    server = fake_http({VERTEX_HOST, "storage.googleapis.com"})

    def create_job(req):
        job_id = req["query"]["pipelineJobId"][0]
        return 200, {**req["json"], "name": f"{req['path'][len('/v1/'):]}/{job_id}",
                     "state": "PIPELINE_STATE_PENDING"}

    def create_schedule(req):
        return 200, {**req["json"], "name": f"{req['path'][len('/v1/'):]}/8675309", "state": "ACTIVE"}

    # PipelineJob.submit first checks that the pipeline_root bucket exists (google-cloud-storage).
    server.route("GET", r"^/storage/v1/b/dp-artifacts$", lambda req: (200, {"name": "dp-artifacts"}))
    server.route("POST", r"^/v1/projects/dp-proj/locations/us-central1/pipelineJobs$", create_job)
    server.route("POST", r"^/v1/projects/dp-proj/locations/us-central1/schedules$", create_schedule)
    return server


@pytest.fixture
def anonymous():
    """Credentials that attach nothing; afterwards aiplatform's process-wide init() settings are reset."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud.aiplatform import initializer

    yield AnonymousCredentials()
    initializer.global_config.__init__()


def test_vertex_run_sends_spec_parameters_and_root(vertex_server, package, anonymous):
    out = submit_vertex(package, project="dp-proj", region="us-central1", pipeline_root=ROOT,
                        parameters=PARAMS, display_name="dp-run", credentials=anonymous,
                        service_account="runner@dp-proj.iam.gserviceaccount.com", labels={"team": "privacy"})

    jobs = vertex_server.find("POST", r"/pipelineJobs$")
    assert len(jobs) == 1
    req = jobs[0]
    assert req["host"] == VERTEX_HOST
    body = req["json"]
    assert body["displayName"] == "dp-run"
    assert body["runtimeConfig"]["gcsOutputDirectory"] == ROOT
    assert body["runtimeConfig"]["parameterValues"] == PARAMS
    assert body["serviceAccount"] == "runner@dp-proj.iam.gserviceaccount.com"
    assert body["labels"] == {"team": "privacy"}
    assert body["pipelineSpec"]["pipelineInfo"]["name"] == "tiny-dp"
    assert all(t["cachingOptions"].get("enableCache", False) is False
               for t in body["pipelineSpec"]["root"]["dag"]["tasks"].values())
    assert req["query"]["pipelineJobId"][0].startswith("tiny-dp-")
    # Before creating the job the SDK checked that pipeline_root's bucket exists (and did not create one).
    assert [r["method"] for r in vertex_server.requests if r["host"] == "storage.googleapis.com"] == ["GET"]
    assert vertex_server.find("GET", r"^/storage/v1/b/dp-artifacts$")
    # Anonymous credentials: no Authorization header was attached.
    assert "Authorization" not in req["headers"] and "authorization" not in req["headers"]
    assert {r["host"] for r in vertex_server.requests} <= {VERTEX_HOST, "storage.googleapis.com"}
    assert out["kind"] == "run" and out["backend"] == "vertex"
    assert out["resource_name"] == f"projects/dp-proj/locations/us-central1/pipelineJobs/{out['job_id']}"
    assert not vertex_server.find("POST", r"/schedules$")


def test_vertex_schedule_sends_cron(vertex_server, package, anonymous):
    out = submit_vertex(package, project="dp-proj", region="us-central1", pipeline_root=ROOT,
                        parameters=PARAMS, credentials=anonymous, schedule="CRON_TZ=Europe/Berlin 0  3 * * 1")

    assert not vertex_server.find("POST", r"/pipelineJobs$")  # a schedule, not a run now
    scheds = vertex_server.find("POST", r"/schedules$")
    assert len(scheds) == 1
    body = scheds[0]["json"]
    assert body["cron"] == "CRON_TZ=Europe/Berlin 0 3 * * 1"
    assert body["displayName"] == "dpfedemb"
    assert body["maxConcurrentRunCount"] == "1"
    job = body["createPipelineJobRequest"]
    assert job["parent"] == "projects/dp-proj/locations/us-central1"
    assert job["pipelineJob"]["runtimeConfig"]["gcsOutputDirectory"] == ROOT
    assert job["pipelineJob"]["runtimeConfig"]["parameterValues"] == PARAMS
    assert job["pipelineJob"]["pipelineSpec"]["pipelineInfo"]["name"] == "tiny-dp"
    assert out["kind"] == "schedule"
    assert out["resource_name"] == "projects/dp-proj/locations/us-central1/schedules/8675309"
    assert out["cron"] == "CRON_TZ=Europe/Berlin 0 3 * * 1"


# ----------------------------------------------------------------------------------------------
# errors before anything is sent
# ----------------------------------------------------------------------------------------------

def _vertex(package, **over):
    kw = dict(project="dp-proj", region="us-central1", pipeline_root=ROOT, parameters={"data_root": "x"})
    kw.update(over)
    return submit_vertex(package, **kw)


@pytest.mark.parametrize("over, match", [
    ({"project": ""}, r"^project: required"),
    ({"project": "projects/dp-proj"}, r"^project: .*bare project id"),
    ({"region": " "}, r"^region: required"),
    ({"pipeline_root": "/tmp/root"}, r"^pipeline_root: '/tmp/root' is not a Cloud Storage path"),
    ({"pipeline_root": "s3://bucket/x"}, r"^pipeline_root: .*gs://bucket/path"),
    ({"parameters": {"rounds": 3}}, r"^parameters: the pipeline requires data_root"),
    ({"parameters": {"data_root": "x", "epsilon": 1.0}}, r"^parameters: epsilon not declared .* it takes: data_root, note, rounds"),
    ({"parameters": [("data_root", "x")]}, r"^parameters: expected a mapping"),
    ({"schedule": "0 3 * *"}, r"^schedule: invalid cron expression '0 3 \* \*': it has 4 fields, not 5"),
    ({"labels": {"Bad Label": "x"}}, r"^labels: key 'Bad Label' is not a Google Cloud label key"),
    ({"labels": {"team": 3}}, r"^labels: value 3 of 'team'"),
    ({"region": "mars-north1"}, r"^Vertex AI rejected the submission before sending it: Unsupported region"),
    ({"parameters": {"data_root": "x", "rounds": "many"}}, r"^parameters: rounds='many' is a str, the pipeline declares it NUMBER_INTEGER"),
    ({"parameters": {"data_root": "x", "rounds": True}}, r"^parameters: rounds=True is a bool"),
])
def test_vertex_bad_input(package, fake_http, over, match):
    server = fake_http(set())
    with pytest.raises(SubmitError, match=match):
        _vertex(package, **over)
    assert server.requests == []


def test_missing_package_is_named(tmp_path, fake_http):
    server = fake_http(set())
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(SubmitError, match=r"^package_path: no pipeline package at .*nope\.yaml.*compile"):
        submit_vertex(missing, project="p", region="us-central1", pipeline_root=ROOT, parameters={})
    with pytest.raises(SubmitError, match=r"^package_path: no pipeline package"):
        submit_kfp(missing, host=KFP_HOST, parameters={})
    not_pipeline = tmp_path / "x.yaml"
    not_pipeline.write_text("a: 1\n")
    with pytest.raises(SubmitError, match=r"^package_path: .* is not a compiled KFP pipeline"):
        submit_kfp(str(not_pipeline), host=KFP_HOST, parameters={})
    assert server.requests == []


@pytest.mark.parametrize("host", ["", "kfp.example.test:8888", "ftp://kfp", "http://"])
def test_kfp_bad_host(package, fake_http, host):
    server = fake_http(set())
    with pytest.raises(SubmitError, match=r"^host: "):
        submit_kfp(package, host=host, parameters={"data_root": "x"})
    assert server.requests == []


def test_kfp_rejects_time_zone_prefix(package):
    with pytest.raises(SubmitError, match=r"^schedule: .*time zone prefix.*KFP"):
        submit_kfp(package, host=KFP_HOST, parameters={"data_root": "x"}, schedule="TZ=UTC 0 3 * * *")


# ----------------------------------------------------------------------------------------------
# cron
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("expr, norm", [
    ("0 3 * * 1", "0 3 * * 1"),
    ("  */15   0-6/2 1,15 JAN-mar sun ", "*/15 0-6/2 1,15 JAN-mar sun"),
    ("59 23 31 12 6", "59 23 31 12 6"),
    ("5/10 * * * *", "5/10 * * * *"),
    ("CRON_TZ=America/New_York 1 * * * *", "CRON_TZ=America/New_York 1 * * * *"),
])
def test_validate_cron_accepts(expr, norm):
    assert validate_cron(expr) == norm


@pytest.mark.parametrize("expr, why", [
    ("", r"empty cron expression"),
    ("@daily", r"it has 1 fields, not 5"),
    ("0 0 3 * * 1", r"6 fields, not 5 \(KFP's 6-field form"),
    ("60 * * * *", r"minute value 60 is outside 0-59"),
    ("0 24 * * *", r"hour value 24 is outside 0-23"),
    ("0 0 0 * *", r"day-of-month value 0 is outside 1-31"),
    ("0 0 * 13 *", r"month value 13 is outside 1-12"),
    ("0 0 * * 7", r"day-of-week value 7 is outside 0-6 \(0 is Sunday\)"),
    ("0 0 * * FUN", r"day-of-week field has 'FUN', not a number or a name"),
    ("*/0 * * * *", r"minute field has step '0'"),
    ("10-5 * * * *", r"minute range '10-5' runs backwards"),
    ("0 0 ? * *", r"day-of-month field has '\?'"),
    ("TZ=bad zone! 0 * * * *", r"it has 6 fields|not a time zone"),
    ("X=1 0 * * * *", r"'X=1' is not a time zone prefix"),
])
def test_validate_cron_rejects(expr, why):
    with pytest.raises(SubmitError, match=r"^schedule: ") as err:
        validate_cron(expr)
    assert re.search(why, str(err.value))
    assert "minute hour day-of-month month day-of-week" in str(err.value)


def test_kfp_cron_prefixes_seconds():
    assert kfp_cron("0 3 * * 1") == "0 0 3 * * 1"
    assert kfp_cron(" */5  * * * * ") == "0 */5 * * * *"

