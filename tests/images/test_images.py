"""The images build with a real Docker engine and run: `kubetune-train --help` in the trainer image, the
operator's kopf command in the operator image. Skipped, saying why, without a running engine or a local
base image (KUBETUNE_BASE_IMAGE; scripts/local-base-image.sh makes one where no registry is reachable)."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BASE = os.environ.get("KUBETUNE_BASE_IMAGE", "")
CONTEXT = ("pyproject.toml", "trainer/kubetune_trainer", "operator/kubetune_operator", "examples/data")

# The distribution's metadata, which the code reads (the operator's default trainer image tag).
VERSION = "import importlib.metadata as m; print(m.version('kubetune'))"
PROJECT_VERSION = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)

pytestmark = pytest.mark.slow


def docker(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("docker") is None or docker("info", timeout=20).returncode:
        pytest.skip("no Docker engine running (apt-get install docker.io; dockerd &)")
    if not BASE or docker("image", "inspect", BASE, timeout=20).returncode:
        pytest.skip("no local base image: set KUBETUNE_BASE_IMAGE (scripts/local-base-image.sh makes one)")
    ctx = tmp_path_factory.mktemp("context")
    for item in (*CONTEXT, ".dockerignore", "Dockerfile.trainer", "Dockerfile.operator"):
        source = ROOT / item
        (shutil.copytree if source.is_dir() else shutil.copy)(source, ctx / item)
    # Build-only inputs (.build/): this machine's CA bundle for its TLS-inspecting proxy, and local wheels.
    build = ctx / ".build"
    (build / "wheels").mkdir(parents=True)
    if Path("/etc/ssl/certs/ca-certificates.crt").is_file():
        shutil.copy("/etc/ssl/certs/ca-certificates.crt", build / "ca.crt")
    for wheel in glob.glob(os.path.join(os.environ.get("PIP_FIND_LINKS", "/opt/wheels"), "torch-*+cpu-*.whl")):
        shutil.copy(wheel, build / "wheels")
    return ctx


def build(context: Path, dockerfile: str, tag: str, *args: str) -> dict:
    started = time.monotonic()
    result = docker(
        "build",
        "--network",
        "host",
        "-f",
        dockerfile,
        "-t",
        tag,
        "--build-arg",
        f"BASE_IMAGE={BASE}",
        *args,
        str(context),
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    (info,) = json.loads(docker("image", "inspect", tag).stdout)
    print(f"{tag}: {info['Size'] / 1e6:,.0f} MB, built in {time.monotonic() - started:,.0f} s")
    return info


def torch_spec(context: Path) -> str:
    wheels = list((context / ".build" / "wheels").glob("torch-*.whl"))
    return f"TORCH_SPEC=torch=={wheels[0].name.split('-')[1]}" if wheels else "TORCH_SPEC=torch"


def test_the_trainer_image_runs_kubetune_train_as_a_non_root_user(context):
    info = build(
        context, str(context / "Dockerfile.trainer"), "kubetune/trainer:test", "--build-arg", torch_spec(context)
    )
    assert info["Config"]["User"] == "1000:1000"
    assert info["Config"]["Entrypoint"] == ["kubetune-train"]
    result = docker("run", "--rm", "--read-only", "kubetune/trainer:test", "--help", timeout=300)
    assert result.returncode == 0, result.stderr
    for command in ("run", "prepare", "preflight", "quickstart"):
        assert command in result.stdout
    data = docker(
        "run", "--rm", "--entrypoint", "ls", "kubetune/trainer:test", "/opt/kubetune/examples/data", timeout=60
    )
    assert "bank-support-chat.jsonl" in data.stdout
    build_inputs = docker("run", "--rm", "--entrypoint", "ls", "kubetune/trainer:test", "/tmp", timeout=60)
    assert "build" not in build_inputs.stdout, "build-only inputs stay out of the image"
    version = docker("run", "--rm", "--entrypoint", "python3", "kubetune/trainer:test", "-c", VERSION, timeout=60)
    assert version.stdout.strip() == PROJECT_VERSION, version.stderr
    # A plain `docker run` writes its output into the working directory, as the Jobs do on the run's volume.
    workspace = docker(
        "run", "--rm", "--entrypoint", "sh", "kubetune/trainer:test", "-c", "touch probe && stat -c %u:%g .", timeout=60
    )
    assert workspace.returncode == 0 and workspace.stdout.split() == ["1000:1000"], workspace.stderr


def test_a_pyproject_edit_keeps_the_torch_layer(context):
    """The dependency stage before and after an edit of pyproject.toml: only its last two layers (the COPY of
    pyproject.toml and the install from it) change; torch and everything under it come from the cache."""

    def layers() -> list[str]:
        build(
            context,
            str(context / "Dockerfile.trainer"),
            "kubetune/trainer-deps:test",
            "--target",
            "deps",
            "--build-arg",
            torch_spec(context),
        )
        (info,) = json.loads(docker("image", "inspect", "kubetune/trainer-deps:test").stdout)
        return info["RootFS"]["Layers"]

    pyproject = context / "pyproject.toml"
    original = pyproject.read_text()
    before = layers()
    try:
        pyproject.write_text(original + "# an edit\n")
        after = layers()
    finally:
        pyproject.write_text(original)
    assert len(after) == len(before)
    kept = next((n for n, (a, b) in enumerate(zip(before, after, strict=True)) if a != b), len(before))
    assert kept == len(before) - 2, f"only {kept} of {len(before)} layers kept: torch was installed again"
    torch = docker("run", "--rm", "kubetune/trainer-deps:test", "/opt/venv/bin/pip", "show", "torch", timeout=60)
    assert "Name: torch" in torch.stdout


def test_the_operator_image_starts_kopf_with_the_probe_endpoint(context):
    info = build(context, str(context / "Dockerfile.operator"), "kubetune/operator:test")
    assert info["Config"]["User"] == "65532:65532"
    assert "--liveness=http://0.0.0.0:8081/healthz" in info["Config"]["Entrypoint"]
    result = docker("run", "--rm", "--read-only", "kubetune/operator:test", "--help", timeout=120)
    assert result.returncode == 0 and "--liveness" in result.stdout, result.stderr
    imports = docker(
        "run",
        "--rm",
        "--entrypoint",
        "python3",
        "kubetune/operator:test",
        "-c",
        "import sys, kubetune_operator.handlers; print('torch' in sys.modules)",
        timeout=120,
    )
    assert imports.stdout.strip() == "False", imports.stderr  # the operator image carries no torch
    version = docker("run", "--rm", "--entrypoint", "python3", "kubetune/operator:test", "-c", VERSION, timeout=60)
    assert version.stdout.strip() == PROJECT_VERSION, version.stderr
