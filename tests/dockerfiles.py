"""The Dockerfiles as Docker reads them, without a Docker engine: instructions, stages, what each COPY takes from
the build context, and the USER and ENTRYPOINT the images run with. For the tests of the images and of the chart,
which must agree with them."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str


def instructions(dockerfile: str) -> list[Instruction]:
    """The instructions in order, continuation lines joined and comments dropped, as Docker reads them."""
    found: list[Instruction] = []
    pending = ""
    for raw in (ROOT / dockerfile).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        found.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    assert not pending, f"{dockerfile} ends inside a continuation"
    return found


def stages(dockerfile: str) -> tuple[list[Instruction], list[list[Instruction]]]:
    """What comes before the first FROM, and each stage from its FROM on."""
    preamble: list[Instruction] = []
    found: list[list[Instruction]] = []
    for instruction in instructions(dockerfile):
        if instruction.keyword == "FROM":
            found.append([instruction])
        elif found:
            found[-1].append(instruction)
        else:
            preamble.append(instruction)
    return preamble, found


def copies(stage: list[Instruction]) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY from the build context (not --from=another stage)."""
    found = []
    for instruction in stage:
        if instruction.keyword != "COPY":
            continue
        words = instruction.args.split()
        if any(w.startswith("--from=") for w in words):
            continue
        paths = [w for w in words if not w.startswith("--")]
        found.append((paths[:-1], paths[-1]))
    return found


def user(dockerfile: str) -> tuple[int, int]:
    _, built = stages(dockerfile)
    (last,) = [i.args for i in built[-1] if i.keyword == "USER"][-1:]
    assert re.fullmatch(r"\d+:\d+", last), f"{dockerfile}: USER {last} is not numeric uid:gid"
    uid, gid = (int(x) for x in last.split(":"))
    return uid, gid


def entrypoint(dockerfile: str) -> list[str]:
    (found,) = [i.args for i in instructions(dockerfile) if i.keyword == "ENTRYPOINT"]
    return json.loads(found)  # exec form: signals reach the process, not a shell
