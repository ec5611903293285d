"""The image checked for real: docker/check.sh builds it, sees it refuse to start without tokens, starts it
with tokens, waits for /ready, uploads a demo adapter, classifies, checks uid 10001 and a 0 exit on SIGTERM.

It runs wherever a Docker engine answers and the build's base image is there or can be pulled; otherwise
it is skipped with the reason. The first build takes minutes (a torch download on a cold cache), later ones
reuse Docker's layer cache; `-m "not docker"` leaves it out. Options for `docker build` (a local
BASE_IMAGE, a torch wheel source, `--network host`) come from the environment variable
LORAPLEX_DOCKER_BUILD_ARGS, split as a shell would.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECK = REPO / "docker" / "check.sh"
DEFAULT_BASE = "python:3.11-slim-bookworm"  # the Dockerfile's BASE_IMAGE default


def engine_unreachable() -> str | None:
    """Why no Docker engine can be used here, or None when one answers."""
    docker = shutil.which("docker")
    if docker is None:
        return "no docker command on PATH"
    try:
        probe = subprocess.run(
            [docker, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=20
        )
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 20 s"
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        return f"`docker info` failed: {reason}"
    return None


def base_image(build_args: list[str]) -> str:
    """The BASE_IMAGE the build will use: the last `--build-arg BASE_IMAGE=...` given, or the default."""
    base = DEFAULT_BASE
    for i, arg in enumerate(build_args):
        value = arg.removeprefix("--build-arg=") if arg.startswith("--build-arg=") else None
        if arg == "--build-arg" and i + 1 < len(build_args):
            value = build_args[i + 1]
        if value and value.startswith("BASE_IMAGE="):
            base = value.removeprefix("BASE_IMAGE=")
    return base


def base_unavailable(base: str) -> str | None:
    """Why the build's base image cannot be had (not present, and its pull failed), or None."""
    docker = shutil.which("docker")
    if subprocess.run([docker, "image", "inspect", base], capture_output=True).returncode == 0:
        return None
    try:
        pull = subprocess.run([docker, "pull", base], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return f"pulling {base} took over 10 minutes"
    if pull.returncode != 0:
        reason = (pull.stderr.strip().splitlines() or ["no output"])[-1]
        return f"{base} is not present and its pull failed: {reason}"
    return None


@pytest.mark.docker
@pytest.mark.timeout(3600)
def test_image_builds_serves_and_stops_cleanly():
    why = engine_unreachable()
    if why:
        pytest.skip(f"no Docker engine reachable ({why}); the image check needs one")
    extra = shlex.split(os.environ.get("LORAPLEX_DOCKER_BUILD_ARGS", ""))
    why = base_unavailable(base_image(extra))
    if why:
        pytest.skip(
            f"no base image to build on ({why}); name a local Debian bookworm image with python 3.11+ in "
            "LORAPLEX_DOCKER_BUILD_ARGS='--build-arg BASE_IMAGE=...'"
        )
    assert os.access(CHECK, os.X_OK), f"{CHECK} is not executable"
    result = subprocess.run(
        [str(CHECK), *extra], cwd=REPO, capture_output=True, text=True, timeout=3500, check=False
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("check:")]
    assert result.returncode == 0, "\n".join([*lines, result.stderr[-4000:]])
    assert lines[-1].startswith("check: ok:"), "\n".join(lines)
    steps = (
        "refuses to start",
        "/ready answered 200",
        "runs as uid 10001",
        "(201)",
        "classified: positive negative",
    )
    for step in steps:
        assert any(step in line for line in lines), f"no {step!r} in:\n" + "\n".join(lines)


def test_the_base_image_is_read_from_the_build_options():
    assert base_image([]) == DEFAULT_BASE
    assert base_image(["--network", "host", "--build-arg", "BASE_IMAGE=local/py:3.11"]) == "local/py:3.11"
    assert base_image(["--build-arg=BASE_IMAGE=a/b:1", "--build-arg", "TORCH_INDEX_URL=x"]) == "a/b:1"
