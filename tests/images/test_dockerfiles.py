"""The Dockerfiles and .dockerignore, read without a Docker engine (CI has none): the base image is a build
argument, the images run as a numeric non-root user with the entrypoints the operator and the chart call,
torch is a layer of its own before anything of the project, and the build context holds what the builds copy
and nothing heavy. test_images.py builds and runs the images where an engine is running."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from kubetune_operator import constants as c
from tests.dockerfiles import ROOT, copies, entrypoint, instructions, stages, user

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

DOCKERFILES = ("Dockerfile.trainer", "Dockerfile.operator")
# Sources a dependency stage may copy before its installs: the optional build-only inputs and their anchor.
BUILD_ONLY = {".dockerignore", ".build*"}


# --------------------------------------------------------------------------- .dockerignore, as Docker reads it


def ignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(is an exception, regex) per line, compiled as moby/patternmatcher does."""
    patterns = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**", i):
                i += 2
                if pattern.startswith("/", i):
                    i += 1
                regex += ".*" if i == len(pattern) else "(.*/)?"
                continue
            char = pattern[i]
            regex += "[^/]*" if char == "*" else "[^/]" if char == "?" else re.escape(char)
            i += 1
        patterns.append((exception, re.compile(f"^{regex}$")))
    return patterns


def in_context(path: str) -> bool:
    """Whether `path` (relative, with /) reaches the build context: the last matching line wins, and a line
    that matches a parent directory matches everything under it."""
    parents = path.split("/")[:-1]
    excluded = False
    for exception, regex in ignore_patterns():
        if exception != excluded:
            continue  # an exception only matters once excluded, an exclusion only before
        if regex.match(path) or any(regex.match("/".join(parents[: i + 1])) for i in range(len(parents))):
            excluded = not exception
    return not excluded


def test_the_ignore_matcher_reads_patterns_as_docker_does():
    """The matcher above against a few rules of Docker's own documentation, through the real file."""
    assert not in_context("trainer/kubetune_trainer/__pycache__/cli.cpython-311.pyc")  # **/__pycache__
    assert in_context("trainer/kubetune_trainer/cli.py")  # let back in below an excluded parent
    assert not in_context("trainer/pyproject.toml")  # `!pyproject.toml` is anchored at the root


# --------------------------------------------------------------------------- the Dockerfiles


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_the_base_image_is_a_build_argument_every_stage_starts_from(dockerfile):
    preamble, built = stages(dockerfile)
    assert [i.args.split("=")[0] for i in preamble if i.keyword == "ARG"] == ["BASE_IMAGE"]
    for stage in built:
        base = stage[0].args.split()[0]
        assert base in {"${BASE_IMAGE}", "$BASE_IMAGE"}, f"{dockerfile}: FROM {base} ignores BASE_IMAGE"


@pytest.mark.parametrize(
    ("dockerfile", "expected"), [("Dockerfile.trainer", c.TRAINER_UID), ("Dockerfile.operator", None)]
)
def test_the_image_runs_as_a_numeric_non_root_user(dockerfile, expected):
    """Numeric, so the kubelet can check runAsNonRoot without a passwd file; the trainer's is the pods' user."""
    uid, gid = user(dockerfile)
    assert uid != 0 and gid != 0
    if expected is not None:
        assert uid == gid == expected


def test_the_trainer_starts_kubetune_train_the_command_the_jobs_run():
    assert entrypoint("Dockerfile.trainer") == ["kubetune-train"]
    # pip writes the console script into the virtualenv when it installs the kubetune distribution (pyproject
    # alone, see below); the module it calls comes with the code.
    script = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["kubetune-train"]
    module = script.split(":")[0]
    assert (ROOT / "trainer" / Path(*module.split("."))).with_suffix(".py").is_file()
    _, built = stages("Dockerfile.trainer")
    sources = [source for sources, _ in copies(built[-1]) for source in sources]
    assert f"trainer/{module.split('.')[0]}" in sources


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_the_image_keeps_the_distributions_metadata_but_not_its_empty_packages(dockerfile):
    """importlib.metadata.version("kubetune") and the console scripts need the installed distribution; the empty
    packages that stood in for the code must not shadow the code where PYTHONPATH is unset."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    _, built = stages(dockerfile)
    (install,) = [i.args for i in built[0] if i.keyword == "RUN" and '"/tmp/pkg[' in i.args]
    assert "uninstall" not in install
    for package in project["tool"]["setuptools"]["package-dir"]:
        assert f'"$site/{package}"' in install.split("rm -r", 1)[-1], package
    (env,) = [i.args for i in built[-1] if i.keyword == "ENV"]
    assert "PYTHONPATH=/opt/kubetune" in env.split()


def test_both_images_set_up_pip_and_install_their_dependencies_alike():
    """Dockerfiles cannot share a step: the copies in the two must not drift (a CA fix made in one only)."""

    def steps(dockerfile: str) -> list[str]:
        _, built = stages(dockerfile)
        return [i.args for i in built[0] if i.keyword == "RUN" and ("build-pip" in i.args or "/tmp/pkg" in i.args)]

    trainer = [step for step in steps("Dockerfile.trainer") if "TORCH" not in step]  # torch: the trainer's own
    operator = steps("Dockerfile.operator")
    assert len(trainer) == len(operator) == 2
    assert [step.replace("[trainer]", "[operator]") for step in trainer] == operator


def test_the_operator_starts_kopf_with_its_liveness_endpoint():
    command = entrypoint("Dockerfile.operator")
    assert command[:3] == ["kopf", "run", "--standalone"]
    module = command[command.index("-m") + 1]
    assert (ROOT / "operator" / Path(*module.split("."))).with_suffix(".py").is_file()
    # The port the chart's probes call (its `health` port).
    assert "--liveness=http://0.0.0.0:8081/healthz" in command
    (cmd,) = [i.args for i in instructions("Dockerfile.operator") if i.keyword == "CMD"]
    assert json.loads(cmd) == ["--all-namespaces"], "the chart's args replace it in namespaced mode"


def test_torch_is_a_layer_of_its_own_before_anything_of_the_project():
    _, built = stages("Dockerfile.trainer")
    deps = built[0]
    (torch,) = [n for n, i in enumerate(deps) if i.keyword == "RUN" and "TORCH_SPEC" in i.args]
    assert "pyproject" not in deps[torch].args and "/tmp/pkg" not in deps[torch].args
    before = [source for sources, _ in copies(deps[:torch]) for source in sources]
    assert set(before) <= BUILD_ONLY, f"{before} before the torch install: an edit there downloads torch again"
    after = [source for sources, _ in copies(deps[torch:]) for source in sources]
    assert after == ["pyproject.toml"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_the_code_comes_last_so_an_edit_rebuilds_only_its_own_layers(dockerfile):
    with_code = 0
    for stage in stages(dockerfile)[1]:
        code = [n for n, (sources, _) in enumerate(copies(stage)) if any("kubetune_" in s for s in sources)]
        if not code:
            continue
        with_code += 1
        first = next(n for n, i in enumerate(stage) if i.keyword == "COPY" and "kubetune_" in i.args)
        assert not [i for i in stage[first:] if i.keyword == "RUN"], f"{dockerfile}: a RUN after the code COPY"
    assert with_code, f"{dockerfile}: no stage copies the code (kubetune_*) from the build context"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_build_only_inputs_stay_in_the_dependency_stage(dockerfile):
    _, built = stages(dockerfile)
    final = built[-1]
    assert not [i for i in final if ".build" in i.args or "/tmp/build" in i.args]
    (venv,) = [i.args for i in final if i.keyword == "COPY" and "--from=" in i.args]
    assert venv.split()[1:] == ["/opt/venv", "/opt/venv"], "only the virtualenv leaves the dependency stage"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_pip_finds_every_file_pyproject_names_without_the_code(dockerfile):
    """The dependency stage installs pyproject.toml with empty packages: it needs each package directory and the
    readme, stubbed, so README.md and the code stay out of its cache key."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    _, built = stages(dockerfile)
    (install,) = [i.args for i in built[0] if i.keyword == "RUN" and '"/tmp/pkg[' in i.args]
    assert f"/tmp/pkg/{project['project']['readme']}" in install
    for package, directory in project["tool"]["setuptools"]["package-dir"].items():
        assert f"/tmp/pkg/{directory}/__init__.py" in install, package


def test_a_plain_docker_run_of_the_trainer_can_write_its_working_directory():
    uid, gid = user("Dockerfile.trainer")
    _, built = stages("Dockerfile.trainer")
    final = built[-1]
    (workdir,) = [n for n, i in enumerate(final) if i.keyword == "WORKDIR"]
    assert final[workdir].args == c.WORKSPACE
    made = " ".join(i.args for i in final[:workdir] if i.keyword == "RUN")
    assert re.search(rf"(install -d -o {uid} -g {gid}|chown {uid}:{gid}) {c.WORKSPACE}\b", made), (
        "WORKDIR alone creates a root-owned directory"
    )


# --------------------------------------------------------------------------- the build context


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        ".git/objects/ab/cdef",
        "runs/tiny/output/adapter_model.safetensors",
        "kubetune-quickstart/checkpoints/step-100/model.safetensors",
        ".ruff_cache/0.6.0/123",
        ".pytest_cache/v/cache/nodeids",
        ".benchmarks/Linux-CPython-3.11/0001.json",
        ".venv/bin/python",
        "kubetune.egg-info/PKG-INFO",
        "operator/kubetune_operator/__pycache__/handlers.cpython-311.pyc",
        "tests/trainer/test_train.py",
        "bench/bench_reporting.py",
        "helm/kubetune/values.yaml",
    ],
)
def test_the_context_leaves_out_what_no_image_uses(path):
    assert not in_context(path)


def test_the_context_holds_every_file_the_builds_copy():
    needed = {".build/ca.crt", ".build/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"}
    for dockerfile in DOCKERFILES:
        for stage in stages(dockerfile)[1]:
            for sources, _ in copies(stage):
                for source in sources:
                    if source in BUILD_ONLY - {".dockerignore"}:
                        continue
                    path = ROOT / source
                    assert path.exists(), f"{dockerfile} copies {source}, which is not in the repository"
                    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
                    needed |= {p.relative_to(ROOT).as_posix() for p in files if "__pycache__" not in p.parts}
    assert {"pyproject.toml", ".dockerignore", "trainer/kubetune_trainer/cli.py"} <= needed
    assert "operator/kubetune_operator/handlers.py" in needed
    left_out = sorted(p for p in needed if not in_context(p))
    assert not left_out, f".dockerignore leaves out files the builds copy: {left_out}"


def test_the_cpu_example_finds_its_data_in_the_trainer_image():
    """examples/trainingrun-cpu-tiny.yaml reads its dataset from the image: a COPY puts it there from the context."""
    run = yaml.safe_load((ROOT / "examples" / "trainingrun-cpu-tiny.yaml").read_text())
    dataset = run["spec"]["dataset"]["path"]
    _, built = stages("Dockerfile.trainer")
    (source,) = [
        f"{sources[0]}{dataset.removeprefix(dest)}" for sources, dest in copies(built[-1]) if dataset.startswith(dest)
    ]
    assert (ROOT / source).is_file(), source
    assert in_context(source)
