"""Question/answer pairs from tabular records, in the prompt/completion format the trainer reads.

`kubetune-train make-qa RECORDS --template FILE --out DIR`: each record (a CSV row or a JSONL
object) fills each template's ``{field}`` placeholders, giving one pair per record and template.
A template file is YAML::

    promptFormat: "Question: {question}\\nAnswer:"     # optional; this is the default
    templates:
      - kind: exact                                   # exact lookup
        question: What is the routing code of the {branch} branch?
        answer: "{routing_code}"
      - kind: reverse                                 # reverse lookup
        question: Which branch has routing code {routing_code}?
        answer: "{branch}"

Every record must have every field a template uses, with a non-empty value: a record that lacks
one, or leaves it empty, is refused naming its file and line (an empty answer would teach the
model to say nothing). Pairs are deduplicated, then split into train/validation/test by their
question: every copy of a question, whatever its answer, lands in one split, so no test question
is ever seen in training. Each question type gets its own share of every split, so a rare type is
trained on and tested too. (Facts are shared on purpose: a paraphrased or reverse question about
a record whose exact question was trained on is what a lookup model is evaluated on.)
"""

from __future__ import annotations

import json
import math
import random
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from kubetune_trainer.checkpoints import mark_dir, unmarked_files, write_atomic
from kubetune_trainer.errors import ConfigError, DataError
from kubetune_trainer.textfiles import csv_table, json_rows

PROMPT_FORMAT = "Question: {question}\nAnswer:"
SPLIT_FILES = {"train": "train.jsonl", "validation": "validation.jsonl", "test": "test.jsonl"}
MARKER = ".made-by-kubetune-make-qa"


@dataclass(frozen=True)
class QATemplate:
    kind: str
    question: str
    answer: str

    def fields(self) -> set[str]:
        """The record fields the template uses; a ConfigError for a malformed placeholder."""
        names = set()
        for text in (self.question, self.answer):
            try:
                names |= {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
            except ValueError as exc:
                raise ConfigError(
                    f"template {self.kind!r}: {exc} in {text!r}; placeholders look like {{field}}."
                ) from None
        if "" in names or any(not n.isidentifier() for n in names):
            raise ConfigError(f"template {self.kind!r}: placeholders must name a record field, like {{branch}}.")
        for text in (self.question, self.answer):  # a format spec or conversion fails only when rendered
            try:
                text.format(**dict.fromkeys(names, ""))
            except ValueError as exc:
                raise ConfigError(
                    f"template {self.kind!r}: {exc} in {text!r}; values are text, so write a placeholder as "
                    "{field} without a format spec or conversion."
                ) from None
        return names


class _TemplateSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, validate_by_name=True)
    kind: str = Field(min_length=1, description="Question type: exact, paraphrased, reverse, natural, ...")
    question: str = Field(min_length=1, description="The question, with {field} placeholders.")
    answer: str = Field(min_length=1, description="The answer, with {field} placeholders.")


class TemplateFile(BaseModel):
    """The shape of a `--template` file."""

    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, validate_by_name=True)
    prompt_format: str = Field(PROMPT_FORMAT, description="How a question becomes a prompt; has {question}.")
    templates: list[_TemplateSpec] = Field(min_length=1, description="One entry per question type.")

    def to_templates(self) -> list[QATemplate]:
        return [QATemplate(t.kind, t.question, t.answer) for t in self.templates]


# --------------------------------------------------------------------------- reading


def load_template_file(path: Path) -> TemplateFile:
    from kubetune_trainer.config import _explain, read_yaml  # the config's own messages: file, line, setting

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--template {path}: cannot read it ({exc.strerror}).") from None
    raw, root = read_yaml(text, f"--template {path}")
    if isinstance(raw, list):  # a bare list of templates is fine too
        raw = {"templates": raw}
    try:
        spec = TemplateFile.model_validate(raw if raw is not None else {})
    except ValidationError as exc:
        raise ConfigError(_explain(exc, TemplateFile, f"--template {path}", root, ())) from None
    if "{question}" not in spec.prompt_format:
        raise ConfigError(f"--template {path}: promptFormat must contain {{question}}.")
    try:
        spec.prompt_format.format(question="")
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            f"--template {path}: promptFormat {spec.prompt_format!r} cannot be filled in ({exc!r}); its only "
            "placeholder is {question}, and other braces are written {{ and }}."
        ) from None
    for template in spec.to_templates():
        try:
            template.fields()
        except ConfigError as exc:
            raise ConfigError(f"--template {path}: {exc}") from None
    return spec


def read_records(path: Path) -> tuple[list[dict[str, str]], list[str]]:
    """Records from a CSV (header row) or JSONL file, every value as text, and where each starts ("file:line"),
    read as the trainer reads its data (BOM, quoting, UTF-8: errors name the file and line)."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise DataError(f"RECORDS {path}: no such file. Give a .csv or .jsonl file of records.")
    records: list[dict[str, str]] = []
    locations: list[str] = []
    if suffix == ".csv":
        header, rows = csv_table(path, "RECORDS")
        for line_no, row in rows:
            records.append(dict(zip(header, row, strict=True)))
            locations.append(f"{path}:{line_no}")
    elif suffix in (".jsonl", ".json"):
        for where, obj in json_rows(path, "RECORDS"):
            records.append({k: "" if v is None else str(v) for k, v in obj.items()})
            locations.append(where)
    else:
        raise DataError(f"RECORDS {path}: unknown file type {suffix or '(none)'}; use .csv or .jsonl.")
    if not records:
        raise DataError(f"RECORDS {path} holds no records; add rows below the header.")
    return records, locations


# --------------------------------------------------------------------------- pure


def record_problem(
    records: Sequence[Mapping[str, object]],
    templates: Sequence[QATemplate],
    source: str,
    locations: Sequence[str] | None,
) -> str | None:
    """The first record that lacks a field a template uses, or has it empty, in words; None if all fit."""
    columns = set().union(*(r.keys() for r in records)) if records else set()
    for t in templates:
        absent = t.fields() - columns
        if absent:  # no record has it: the template or the header is wrong, not one record
            return (
                f"template {t.kind!r} uses field(s) {', '.join(sorted(absent))} that {source} lacks "
                f"(it has {', '.join(sorted(columns))}). Fix the template or add the column."
            )
    used = sorted(set().union(*(t.fields() for t in templates)))
    bad = []
    for i, record in enumerate(records):
        for name in used:
            value = record.get(name)
            if value is None or not str(value).strip():
                bad.append((i, name, "missing" if value is None else "empty"))
    if not bad:
        return None
    i, name, why = bad[0]
    where = locations[i] if locations is not None else f"{source}, record {i + 1}"
    user = next(t.kind for t in templates if name in t.fields())
    more = f" ({len(bad) - 1} more such values in other records or fields)" if len(bad) > 1 else ""
    action = "Add it to that record" if why == "missing" else "Fill it in"
    return (
        f"{where}: field {name!r} is {why}, and template {user!r} uses it{more}. "
        f"{action}, or remove the record; an empty answer or question teaches nothing."
    )


def render_pairs(
    records: Sequence[Mapping[str, object]],
    templates: Iterable[QATemplate],
    source: str = "records",
    prompt_format: str = PROMPT_FORMAT,
    locations: Sequence[str] | None = None,
) -> list[dict[str, str]]:
    """One pair per record and template, duplicates removed, in a stable order.

    A DataError names the first record missing a used field or leaving it empty, by its place in `locations`
    ("file:line")."""
    templates = list(templates)
    problem = record_problem(records, templates, source, locations)
    if problem is not None:
        raise DataError(problem)
    seen: set[tuple[str, str]] = set()
    pairs = []
    for record in records:
        values = {k: str(v) for k, v in record.items()}
        for t in templates:
            prompt = prompt_format.format(question=t.question.format(**values))
            completion = " " + t.answer.format(**values)
            if (prompt, completion) in seen:
                continue
            seen.add((prompt, completion))
            pairs.append({"prompt": prompt, "completion": completion, "kind": t.kind})
    return pairs


SPLIT_ORDER = ("test", "validation", "train")  # who gets a question when the remainders tie


def apportion(size: int, shares: Mapping[str, float], shortfall: Mapping[str, float]) -> dict[str, int]:
    """`size` questions into splits by `shares` (summing to 1), by largest remainder.

    Each split gets the floor of its ideal count; the questions left over go to the largest fractional
    remainders. Ties go to the split furthest below its ideal over the types dealt so far (`shortfall`),
    then in SPLIT_ORDER, so that small types do not all round the same way."""
    ideal = {name: size * shares[name] for name in SPLIT_ORDER}
    counts = {name: math.floor(ideal[name] + 1e-9) for name in SPLIT_ORDER}
    by_claim = sorted(
        SPLIT_ORDER,
        key=lambda n: (-round(ideal[n] - counts[n], 9), -round(shortfall.get(n, 0.0), 9), SPLIT_ORDER.index(n)),
    )
    for name in by_claim[: size - sum(counts.values())]:
        counts[name] += 1
    return counts


def split_pairs(
    pairs: Sequence[dict[str, str]], validation: float, test: float, seed: int
) -> dict[str, list[dict[str, str]]]:
    """Train/validation/test by question: all pairs with one prompt go to one split.

    Every question type (`kind`) is split on its own, by `apportion`, so each type has its share of
    every split however unequal the types' sizes. The split is a function of the seed and the
    questions alone."""
    if not (0 <= validation < 1 and 0 <= test < 1 and validation + test < 1):
        raise ConfigError("--validation-split and --test-split must each be in [0, 1) with a sum below 1.")
    shares = {"validation": validation, "test": test, "train": 1 - validation - test}
    by_prompt: dict[str, list[dict[str, str]]] = {}
    for pair in pairs:
        by_prompt.setdefault(pair["prompt"], []).append(pair)
    by_kind: dict[str, list[str]] = {}
    for prompt, group in by_prompt.items():
        by_kind.setdefault(group[0]["kind"], []).append(prompt)
    rng = random.Random(seed)
    cut: dict[str, list[str]] = {name: [] for name in SPLIT_FILES}
    shortfall = dict.fromkeys(SPLIT_ORDER, 0.0)
    for kind in sorted(by_kind):
        prompts = sorted(by_kind[kind])
        rng.shuffle(prompts)
        counts = apportion(len(prompts), shares, shortfall)
        start = 0
        for name in ("validation", "test", "train"):
            cut[name] += prompts[start : start + counts[name]]
            start += counts[name]
            shortfall[name] += len(prompts) * shares[name] - counts[name]
    out = {name: [pair for p in cut[name] for pair in by_prompt[p]] for name in SPLIT_FILES}
    for name in out:
        rng.shuffle(out[name])
    return out


def ambiguous_questions(pairs: Sequence[dict[str, str]]) -> list[str]:
    """Questions with more than one answer (two records share the asked-for value)."""
    answers: dict[str, set[str]] = {}
    for pair in pairs:
        answers.setdefault(pair["prompt"], set()).add(pair["completion"])
    return sorted(p for p, a in answers.items() if len(a) > 1)


# --------------------------------------------------------------------------- the command


@dataclass
class MadeQA:
    out_dir: Path
    counts: dict[str, int]
    ambiguous: list[str]

    def describe(self) -> str:
        sizes = ", ".join(f"{n} {name}" for name, n in self.counts.items())
        note = f"; {len(self.ambiguous)} questions have several answers" if self.ambiguous else ""
        return f"{sum(self.counts.values())} question/answer pairs ({sizes}) -> {self.out_dir}{note}"

    def dataset_config(self) -> dict[str, str | float]:
        """The config's dataset section that trains on these files."""
        keys = {"train": "path", "validation": "validationPath", "test": "testPath"}
        out: dict[str, str | float] = {
            keys[name]: str(self.out_dir / SPLIT_FILES[name]) for name, n in self.counts.items() if n
        }
        if "validationPath" not in out:
            out["validationSplit"] = 0.0
        if "testPath" not in out:
            out["testSplit"] = 0.0
        return out


def make_qa(
    records_path: Path,
    template_path: Path,
    out_dir: Path,
    *,
    validation: float = 0.1,
    test: float = 0.1,
    seed: int = 42,
) -> MadeQA:
    """Write train/validation/test JSONL files of pairs; never over files this command did not write."""
    spec = load_template_file(template_path)
    records, locations = read_records(records_path)
    pairs = render_pairs(
        records, spec.to_templates(), source=str(records_path), prompt_format=spec.prompt_format, locations=locations
    )
    splits = split_pairs(pairs, validation, test, seed)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file; make-qa writes a directory of splits. Choose another --out.")
    theirs = sorted(unmarked_files(out_dir, MARKER) & set(SPLIT_FILES.values()))  # other files may stay
    if theirs:
        raise ConfigError(
            f"--out {out_dir} already holds {', '.join(theirs)} not written by make-qa; choose another --out."
        )
    mark_dir(out_dir, MARKER, f"written by kubetune-train make-qa from {records_path}")
    for name, rows in splits.items():
        target = out_dir / SPLIT_FILES[name]
        if not rows:  # an empty file would be refused as a split; an earlier run's is stale
            target.unlink(missing_ok=True)
            continue
        write_atomic(target, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return MadeQA(out_dir, {name: len(rows) for name, rows in splits.items()}, ambiguous_questions(pairs))
