"""Training data: read, validate, split, tokenize, batch.

Three row formats are understood:

- ``prompt_completion``: the loss covers the completion and the EOS token after it;
- ``chat``: a list of ``{role, content}`` messages rendered with the tokenizer's chat
  template; the loss covers the assistant turns (their text and end-of-turn tokens) and
  the EOS after a final answer when the template does not end with it;
- ``text``: the loss covers every token and the EOS appended to it.

EOS is appended once: not when the text, or the tokenizer, already ends with it.

Labels are -100 where no loss is taken. Padding is done per batch by position, never
by token id, so an EOS stays a target even when the pad token is the EOS token.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import jinja2
import numpy as np
import pyarrow.compute as pc
import torch

from kubetune_trainer import checkpoints
from kubetune_trainer.config import DatasetConfig
from kubetune_trainer.errors import ConfigError, DataError, exception_chain, first_line, is_disk_full
from kubetune_trainer.textfiles import csv_table, json_rows

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
FILE_TYPES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})
SPLITS = ("train", "validation", "test")


@dataclass
class SplitStats:
    rows: int
    truncated: int = 0
    dropped: int = 0  # rows left with no target token after truncation
    untargeted: int = 0  # chat rows whose assistant turns could not be located
    tokens: int = 0
    target_tokens: int = 0
    max_length: int = 0
    p50_length: int = 0
    p95_length: int = 0


@dataclass
class PreparedData:
    """Tokenized splits ready for the Trainer, and the raw rows they came from."""

    format: str
    train: datasets.Dataset
    validation: datasets.Dataset | None
    test: datasets.Dataset | None
    raw: dict[str, datasets.Dataset]  # the rows of each non-empty split, before tokenization
    stats: dict[str, SplitStats] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"format": self.format, **{name: vars(s) for name, s in self.stats.items()}}

    def row_keys(self) -> list[str]:
        """One string per raw training row, equal for equal rows (for the duplicate check)."""
        return [json.dumps(row, sort_keys=True, default=str) for row in self.raw["train"]]


# --------------------------------------------------------------------------- reading


def check_data_file(path: str, setting: str) -> str:
    """The `datasets` builder for a data file that exists and can be opened; DataError otherwise."""
    file = Path(path)
    builder = FILE_TYPES.get(file.suffix.lower())
    if builder is None:
        raise DataError(
            f"{setting}: cannot read {path!r}: unsupported file type {file.suffix or '(none)'!r}. "
            f"Use one of {', '.join(sorted(FILE_TYPES))}."
        )
    if file.is_dir():
        raise DataError(f"{setting}: {path} is a directory; name the data file in it (one file per split).")
    if not file.is_file():
        where = f" (relative to {Path.cwd()})" if not file.is_absolute() else ""
        raise DataError(f"{setting}: file not found: {path}{where}. Check the path or create the file.")
    try:
        with file.open("rb"):
            pass
    except OSError as exc:
        raise DataError(f"{setting}: cannot open {path}: {exc.strerror}. Check its permissions.") from None
    return builder


def read_table(path: str, setting: str) -> datasets.Dataset:
    """Load one local data file, with errors that name the file and line."""
    file = Path(path)
    builder = check_data_file(path, setting)
    empty = DataError(f"{setting}: {path} holds no rows. Add data to it or point the setting at another file.")
    if builder == "csv":
        ds = _read_csv(file, setting)
    else:
        # datasets' JSON errors name neither line nor field; a plain pass over the file does.
        if builder == "json" and _check_json_lines(file, setting) == 0:
            raise empty
        try:
            ds = datasets.load_dataset(builder, data_files=str(file), split="train")
        except Exception as exc:  # the libraries raise many types; all mean "unreadable file"
            raise DataError(
                f"{setting}: cannot read {path}: {_root_cause(exc)}. Check that the file is valid {builder} "
                "(write it again if it was cut short)."
            ) from None
    if len(ds) == 0:
        raise empty
    return ds


def _root_cause(exc: BaseException) -> str:
    """The innermost error's first line: datasets wraps the parser's own error in a generic one."""
    return first_line(exception_chain(exc)[-1], 10_000).rstrip(".")


def _check_json_lines(file: Path, setting: str) -> int:
    """Raise on the first line that is not a JSON object; return the number of rows."""
    return sum(1 for _ in json_rows(file, setting))


def _read_csv(file: Path, setting: str) -> datasets.Dataset:
    """Every column as text, read with the csv module rather than pandas: pandas guesses types (a
    column of routing codes becomes int and loses its leading zeros) and its errors name no line.
    An empty cell is a missing value."""
    names, rows = csv_table(file, setting)
    if not names:
        return datasets.Dataset.from_dict({})
    columns: list[list[str | None]] = [[] for _ in names]
    for _, fields in rows:
        for column, value in zip(columns, fields, strict=True):
            column.append(value if value != "" else None)
    features = datasets.Features({name: datasets.Value("string") for name in names})
    return datasets.Dataset.from_dict(dict(zip(names, columns, strict=True)), features=features)


def _row_locations(path: str, indices: list[int], setting: str) -> dict[int, str]:
    """'file:line' of CSV rows, 'file row i' of Parquet rows, in one pass (only built on the error path)."""
    file = Path(path)
    if FILE_TYPES.get(file.suffix.lower()) != "csv":
        return {i: f"{path} row {i}" for i in indices}
    wanted, found = set(indices), {}
    for i, (line, _) in enumerate(csv_table(file, setting)[1]):
        if i in wanted:
            found[i] = f"{path}:{line}"
            if len(found) == len(wanted):
                break
    return found


# --------------------------------------------------------------------------- format detection and validation


def detect_format(columns: Iterable[str], cfg: DatasetConfig, source: str) -> str:
    columns = list(columns)
    if cfg.format != "auto":
        needed = required_columns(cfg.format, cfg)
        missing = [c for c in needed if c not in columns]
        if missing:
            raise DataError(
                f"{source}: format {cfg.format} needs column(s) {', '.join(map(repr, missing))}, but the file has "
                f"{', '.join(map(repr, columns))}. Rename the columns or set dataset.{_field_setting(cfg.format)}."
            )
        return cfg.format
    if cfg.messages_field in columns:
        return "chat"
    if cfg.prompt_field in columns and cfg.completion_field in columns:
        return "prompt_completion"
    if cfg.text_field in columns:
        return "text"
    raise DataError(
        f"{source}: cannot tell the data format from the columns {', '.join(map(repr, columns))}. "
        f"Expected {cfg.prompt_field!r} and {cfg.completion_field!r} (prompt_completion), "
        f"{cfg.messages_field!r} (chat) or {cfg.text_field!r} (text); set dataset.format and the "
        "dataset.*Field settings to match your columns."
    )


def required_columns(fmt: str, cfg: DatasetConfig) -> list[str]:
    return {
        "prompt_completion": [cfg.prompt_field, cfg.completion_field],
        "chat": [cfg.messages_field],
        "text": [cfg.text_field],
    }[fmt]


def _field_setting(fmt: str) -> str:
    return {"prompt_completion": "promptField/completionField", "chat": "messagesField", "text": "textField"}[fmt]


def row_problem(row: dict[str, Any], fmt: str, cfg: DatasetConfig) -> str | None:
    """Why a row cannot be trained on, or None. Pure: one row in, one verdict out."""

    def text_problem(name: str, allow_empty: bool = False) -> str | None:
        value = row.get(name)
        if value is None:
            return f"field {name!r} is missing"
        if not isinstance(value, str):
            return f"field {name!r} must be a string, found {type(value).__name__}"
        if not allow_empty and not value.strip():
            return f"field {name!r} is empty"
        return None

    if fmt == "prompt_completion":
        return text_problem(cfg.prompt_field, allow_empty=True) or text_problem(cfg.completion_field)
    if fmt == "text":
        return text_problem(cfg.text_field)
    messages = row.get(cfg.messages_field)
    if not isinstance(messages, list) or not messages:
        return f"field {cfg.messages_field!r} must be a non-empty list of {{role, content}} messages"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"message {i} is not an object"
        if message.get("role") not in CHAT_ROLES:
            return f"message {i} has role {message.get('role')!r}; expected one of {', '.join(sorted(CHAT_ROLES))}"
        if not isinstance(message.get("content"), str):
            return f"message {i} has no text 'content'"
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        return "no assistant message with content: nothing to learn from this conversation"
    return None


def validate_rows(ds: datasets.Dataset, fmt: str, cfg: DatasetConfig, path: str, setting: str) -> None:
    """Raise if any of the len(ds) leading rows of path cannot be trained on: how many, and the first
    few by line, so one fix-and-rerun cycle covers the whole file."""
    columns = required_columns(fmt, cfg)
    problems: list[str] = []
    if FILE_TYPES.get(Path(path).suffix.lower()) == "json":
        # The file again, not ds: one non-string value makes datasets store the whole column as Json, and
        # read back every string in it that parses as JSON (" 499858816") as a number.
        for _, (where, row) in zip(range(len(ds)), json_rows(Path(path), setting), strict=False):
            if problem := row_problem({c: row.get(c) for c in columns}, fmt, cfg):
                problems.append(f"{where}: {problem}")
    else:
        values = {c: ds[c] for c in columns}  # CSV: all text, as read; Parquet: the file's own types
        bad = [(i, p) for i in range(len(ds)) if (p := row_problem({c: values[c][i] for c in columns}, fmt, cfg))]
        where = _row_locations(path, [i for i, _ in bad[:3]], setting)  # only the rows the message names
        problems = [f"{where.get(i, f'{path} row {i}')}: {problem}" for i, problem in bad]
    if not problems:
        return
    how = f"(format {fmt}; columns are set by dataset.{_field_setting(fmt)})"
    if len(problems) == 1:
        raise DataError(f"{setting}: {problems[0]}. Fix or remove that row {how}.")
    shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
    raise DataError(
        f"{setting}: {len(problems)} of {len(ds)} rows cannot be trained on: {shown}. Fix or remove those rows {how}."
    )


# --------------------------------------------------------------------------- splitting


def split_sizes(n: int, validation: float, test: float) -> tuple[int, int, int]:
    """Rows for (train, validation, test) out of n, rounding half up."""
    n_val = math.floor(n * validation + 0.5)
    n_test = math.floor(n * test + 0.5)
    return n - n_val - n_test, n_val, n_test


def split_indices(n: int, validation: float, test: float, seed: int) -> dict[str, list[int]]:
    """A deterministic shuffled partition of range(n): the same seed gives the same split."""
    n_train, n_val, _n_test = split_sizes(n, validation, test)
    order = np.random.default_rng(seed).permutation(n).tolist()
    return {
        "train": sorted(order[:n_train]),
        "validation": sorted(order[n_train : n_train + n_val]),
        "test": sorted(order[n_train + n_val :]),
    }


def load_splits(cfg: DatasetConfig) -> tuple[str, dict[str, datasets.Dataset]]:
    """Read and validate the data files; return the format and the raw train/validation/test rows."""
    train = read_table(cfg.path, "dataset.path")
    if cfg.max_samples is not None:
        train = train.select(range(min(cfg.max_samples, len(train))))
    fmt = detect_format(train.column_names, cfg, f"dataset.path: {cfg.path}")
    validate_rows(train, fmt, cfg, cfg.path, "dataset.path")

    fractions = {
        "validation": 0.0 if cfg.validation_path else cfg.validation_split,
        "test": 0.0 if cfg.test_path else cfg.test_split,
    }
    indices = split_indices(len(train), fractions["validation"], fractions["test"], cfg.split_seed)
    splits = {name: train.select(idx) for name, idx in indices.items()}
    for name, path in (("validation", cfg.validation_path), ("test", cfg.test_path)):
        if path:
            setting = f"dataset.{name}Path"
            ds = read_table(path, setting)
            detect_format(ds.column_names, cfg.model_copy(update={"format": fmt}), f"{setting}: {path}")
            validate_rows(ds, fmt, cfg, path, setting)
            splits[name] = ds
        elif fractions[name] > 0 and len(splits[name]) == 0:
            raise DataError(
                f"dataset.path: {cfg.path} has {len(train)} rows, so a {fractions[name]:.0%} {name} split is "
                f"empty. Add rows, give dataset.{name}Path, or set dataset.{name}Split: 0 to go without."
            )
    if len(splits["train"]) == 0:
        raise DataError(f"dataset.path: {cfg.path}: no rows are left for training after the splits.")
    return fmt, splits


# --------------------------------------------------------------------------- tokenization


def tokenize_prompt_completion(
    prompts: Sequence[str], completions: Sequence[str], tokenizer: Any, train_on_prompt: bool
) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt and completion are tokenized apart, exactly as generation will see the prompt."""
    prompt_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    inputs, labels = [], []
    for p, c in zip(prompt_ids, completion_ids, strict=True):
        c = _with_eos(c, eos)
        ids = [*p, *c]
        inputs.append(ids)
        labels.append(list(ids) if train_on_prompt else [IGNORE_INDEX] * len(p) + c)
    return inputs, labels


def tokenize_text(texts: Sequence[str], tokenizer: Any) -> tuple[list[list[int]], list[list[int]]]:
    # A tokenizer that appends EOS itself (add_eos_token, a template post-processor) must not get a second.
    ids = [_with_eos(t, tokenizer.eos_token_id) for t in tokenizer(list(texts), add_special_tokens=True)["input_ids"]]
    return ids, [list(t) for t in ids]


def _with_eos(ids: list[int], eos: int) -> list[int]:
    """ids ending with one EOS: appended unless the text (or the tokenizer) already ends with it."""
    return list(ids) if ids and ids[-1] == eos else [*ids, eos]


def assistant_spans(messages: list[dict[str, str]], tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; return its text and the character spans of its assistant turns.

    A turn's span runs from the end of the generation prompt before it to the end of the
    conversation rendered through it, so it includes the end-of-turn marker the model must
    learn to emit. Turns that the template renders differently once later turns follow
    (templates that strip earlier reasoning, say) are not prefixes of the whole and are left
    out of the loss rather than mislabelled.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render_prefix(messages[:i], tokenizer)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if text.startswith(before) and text.startswith(through) and len(through) > len(before):
            spans.append((len(before), len(through)))
    return text, spans


def _render_prefix(messages: list[dict[str, str]], tokenizer: Any) -> str:
    """The text a model sees before it answers; some templates refuse an empty conversation."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except jinja2.TemplateError:
        if messages:
            raise
        return ""


def tokenize_chat(
    conversations: Sequence[list[dict[str, str]]], tokenizer: Any, train_on_prompt: bool
) -> tuple[list[list[int]], list[list[int]]]:
    rendered = []
    for messages in conversations:
        try:
            rendered.append(assistant_spans(messages, tokenizer))
        except jinja2.TemplateError as exc:
            first = next((m["content"] for m in messages if m["role"] == "user"), "")[:60]
            raise DataError(
                f"The model's chat template rejects a conversation ({exc}); the one whose first user message "
                f"starts {first!r}. Fix that row (roles, their order) or use a model whose template accepts it."
            ) from None
    encoded = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    eos = tokenizer.eos_token_id
    inputs, labels = [], []
    for messages, (text, spans), ids, offsets in zip(
        conversations, rendered, encoded["input_ids"], encoded["offset_mapping"], strict=True
    ):
        ids = list(ids)
        if train_on_prompt:
            lab = list(ids)
        else:
            lab = [
                tok if any(lo <= start < hi for lo, hi in spans) else IGNORE_INDEX
                for tok, (start, _end) in zip(ids, offsets, strict=True)
            ]
        if _needs_final_eos(messages, text, spans, tokenizer.eos_token, train_on_prompt):
            ids.append(eos)
            lab.append(eos)
        inputs.append(ids)
        labels.append(lab)
    return inputs, labels


def _needs_final_eos(
    messages: list[dict[str, str]], text: str, spans: list[tuple[int, int]], eos_token: str, train_on_prompt: bool
) -> bool:
    """Whether a conversation gets the tokenizer's EOS appended, as a target, after its final answer.

    Templates end an assistant turn with their end-of-turn marker (ChatML's <|im_end|>), but generation
    stops at the model's EOS, which for many bases is another token (<|endoftext|>): without it a chat
    fine-tune never learns to stop, as prompt_completion and text data do. A template whose
    end-of-turn marker is the EOS (Llama 3, Qwen instruct models) already ends with it and gets nothing.
    Only after a final assistant turn that is learned: an EOS after a user turn, or after an answer
    left out of the loss, would teach the model nothing it generates.
    """
    if messages[-1]["role"] != "assistant" or text.rstrip().endswith(eos_token):
        return False
    return train_on_prompt or (bool(spans) and spans[-1][1] >= len(text.rstrip()))


def _tokenize_batch(
    batch: dict[str, list[Any]], indices: list[int], *, fmt: str, cfg: DatasetConfig, tokenizer: Any
) -> dict:
    if fmt == "prompt_completion":
        inputs, labels = tokenize_prompt_completion(
            batch[cfg.prompt_field], batch[cfg.completion_field], tokenizer, cfg.train_on_prompt
        )
    elif fmt == "chat":
        inputs, labels = tokenize_chat(batch[cfg.messages_field], tokenizer, cfg.train_on_prompt)
    else:
        inputs, labels = tokenize_text(batch[cfg.text_field], tokenizer)
    limit = cfg.max_seq_length
    return {
        "index": list(indices),
        "input_ids": [ids[:limit] for ids in inputs],
        "labels": [lab[:limit] for lab in labels],
        "length": [min(len(ids), limit) for ids in inputs],
        "truncated": [len(ids) > limit for ids in inputs],
        "targets": [sum(t != IGNORE_INDEX for t in lab[:limit]) for lab in labels],
        "untargeted": [all(t == IGNORE_INDEX for t in lab) for lab in labels],
    }


def tokenize_split(
    ds: datasets.Dataset, fmt: str, cfg: DatasetConfig, tokenizer: Any, name: str
) -> tuple[datasets.Dataset, SplitStats]:
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "dataset.format is chat, but the model's tokenizer has no chat template. Use a chat/instruct "
            "model, add a chat_template to tokenizer_config.json, or convert the data to prompt_completion.",
            check="model.chat_template",
        )
    tokenized = ds.map(
        _tokenize_batch,
        batched=True,
        with_indices=True,  # "index" ties a sample back to its row, e.g. in high_loss_samples.jsonl
        remove_columns=ds.column_names,
        fn_kwargs={"fmt": fmt, "cfg": cfg, "tokenizer": tokenizer},
        desc=f"Tokenizing {name}",
        load_from_cache_file=False,
    )
    truncated = int(sum(tokenized["truncated"]))
    targets = np.asarray(tokenized["targets"])
    untargeted = int(sum(tokenized["untargeted"]))
    keep = np.flatnonzero(targets > 0)
    lengths = np.asarray(tokenized["length"])
    stats = SplitStats(
        rows=len(keep),
        truncated=truncated,
        untargeted=untargeted,
        dropped=int(len(targets) - len(keep)) - untargeted,
        tokens=int(lengths[keep].sum()),
        target_tokens=int(targets[keep].sum()),
        max_length=int(lengths.max(initial=0)),
        p50_length=int(np.percentile(lengths[keep], 50)) if len(keep) else 0,
        p95_length=int(np.percentile(lengths[keep], 95)) if len(keep) else 0,
    )
    if len(keep) < len(targets):
        tokenized = tokenized.select(keep.tolist())
    if untargeted:
        # Only chat data can get here: the template renders a turn differently once later turns follow
        # (or adds text to the generation prompt), so no assistant text could be located.
        log.warning(
            "%s: in %d of %d conversations no assistant turn could be located in the rendered chat template; "
            "they are left out of training.",
            name,
            untargeted,
            len(targets),
        )
    if stats.truncated:
        log.warning(
            "%s: %d of %d samples are longer than dataset.maxSeqLength=%d and were truncated%s.",
            name,
            truncated,
            len(targets),
            cfg.max_seq_length,
            f"; {stats.dropped} lost every target token and were dropped" if stats.dropped else "",
        )
    if stats.rows == 0 and untargeted:
        raise DataError(
            f"The {name} split has no conversation whose assistant turns could be located in the output of the "
            "model's chat template (it renders earlier turns differently, or its generation prompt adds text). "
            "Convert the data to prompt_completion, or set dataset.trainOnPrompt: true to learn every token."
        )
    if stats.rows == 0:
        raise DataError(
            f"The {name} split has no sample with a target token left after truncation to "
            f"dataset.maxSeqLength={cfg.max_seq_length}. Raise dataset.maxSeqLength or shorten the prompts."
        )
    return tokenized.remove_columns(["truncated", "targets", "untargeted"]), stats


def prepare(cfg: DatasetConfig, tokenizer: Any) -> PreparedData:
    """Everything from the data files to tokenized splits."""
    if tokenizer.eos_token_id is None:
        raise DataError("The model's tokenizer has no eos_token; set one in its tokenizer_config.json.")
    fmt, raw = load_splits(cfg)
    out: dict[str, datasets.Dataset | None] = {}
    stats: dict[str, SplitStats] = {}
    for name in SPLITS:
        if len(raw[name]) == 0:
            out[name] = None
            continue
        out[name], stats[name] = tokenize_split(raw[name], fmt, cfg, tokenizer, name)
    assert out["train"] is not None
    raw = {name: rows for name, rows in raw.items() if len(rows)}
    return PreparedData(fmt, out["train"], out["validation"], out["test"], raw, stats)


# --------------------------------------------------------------------------- prepared data on the volume

PREPARED_META = "prepared.json"


def file_signature(path: str) -> list[Any]:
    """Size plus sha256 of the first and last MiB: catches edits and appends without reading
    a many-gigabyte file whole."""
    file = Path(path)
    size = file.stat().st_size
    digest = hashlib.sha256()
    with file.open("rb") as fh:
        digest.update(fh.read(1 << 20))
        if size > 2 << 20:
            fh.seek(-(1 << 20), os.SEEK_END)
            digest.update(fh.read())
    return [str(file.resolve()), size, digest.hexdigest()]


def tokenizer_signature(tokenizer: Any) -> str:
    """Changes whenever the tokenizer would tokenize differently."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [
        backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True),
        repr(sorted(tokenizer.special_tokens_map.items())),
        str(tokenizer.chat_template),
        str(getattr(tokenizer, "add_bos_token", None)),
        str(getattr(tokenizer, "add_eos_token", None)),
    ]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def data_fingerprint(cfg: DatasetConfig, tokenizer: Any) -> str:
    """Changes when the files, the data settings or the tokenizer change."""
    parts = {
        "dataset": cfg.model_dump(mode="json", exclude={"prepared_dir"}),
        "files": [file_signature(p) for p in (cfg.path, cfg.validation_path, cfg.test_path) if p],
        "tokenizer": tokenizer_signature(tokenizer),
        "layout": 3,  # bump when tokenization or the tokenized columns change
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_prepared_dir(directory: Path, cfg: DatasetConfig) -> None:
    """Refuse a preparedDir that holds anything but kubetune's prepared data: it gets replaced whole."""
    inputs = [Path(p).resolve() for p in (cfg.path, cfg.validation_path, cfg.test_path) if p]
    if directory.exists() and not directory.is_dir():
        raise DataError(
            f"dataset.preparedDir={directory} is a file, not a directory; kubetune would replace it. Point "
            "dataset.preparedDir at a directory of its own, e.g. prepared.",
            check="dataset.preparedDir",
        )
    if any(directory.resolve() in p.parents for p in inputs):
        raise DataError(
            f"dataset.preparedDir={directory} contains the data files; kubetune replaces that directory whole. "
            "Point it at a directory of its own, e.g. prepared.",
            check="dataset.preparedDir",
        )
    if directory.is_dir() and any(directory.iterdir()) and not (directory / PREPARED_META).is_file():
        raise DataError(
            f"dataset.preparedDir={directory} holds files that kubetune did not write; it replaces that "
            "directory whole. Point it at an empty directory or one of its own.",
            check="dataset.preparedDir",
        )


def save_prepared(data: PreparedData, directory: Path, fingerprint: str) -> None:
    """Write tokenized and raw splits to a sibling directory, fsync them, then swap it into place.

    A directory that cannot be written fails the preflight check disk.prepared (a full volume stays an
    OSError, which the CLI reports as one)."""
    try:
        _save_prepared(data, directory, fingerprint)
    except OSError as exc:
        if is_disk_full(exc):
            raise
        raise ConfigError(
            f"dataset.preparedDir={directory} cannot be written ({exc.strerror or exc}); point it at a writable "
            "directory on the run's volume.",
            check="disk.prepared",
        ) from None


def _save_prepared(data: PreparedData, directory: Path, fingerprint: str) -> None:
    checkpoints.make_dirs(directory.parent)
    if not directory.parent.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "a file is in the way", str(directory.parent))
    for leftover in directory.parent.glob(f".{directory.name}.*"):  # a swap interrupted by a kill
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.new-"))
    splits = {"train": data.train, "validation": data.validation, "test": data.test}
    datasets.DatasetDict({k: v for k, v in splits.items() if v is not None}).save_to_disk(str(tmp / "tokenized"))
    # datasets cannot load an empty split back from disk; absent means empty.
    datasets.DatasetDict({k: v for k, v in data.raw.items() if len(v)}).save_to_disk(str(tmp / "raw"))
    meta = {"fingerprint": fingerprint, "format": data.format, "stats": {k: vars(v) for k, v in data.stats.items()}}
    (tmp / PREPARED_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    checkpoints.fsync_tree(tmp)  # a node crash must not leave a prepared.json over half-written tables
    if directory.exists():
        old = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.old-"))
        os.replace(directory, old / "prepared")
        os.replace(tmp, directory)
        shutil.rmtree(old)
    else:
        os.replace(tmp, directory)
    checkpoints.fsync_path(directory.parent)


def load_prepared(directory: Path, fingerprint: str) -> PreparedData | None:
    """The prepared data in directory if it was made from the same inputs and reads back whole, else None."""
    meta_path = directory / PREPARED_META
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("fingerprint") != fingerprint:
            log.info("Prepared data in %s is stale (other files, settings or tokenizer); tokenizing again", directory)
            return None
        tokenized = datasets.load_from_disk(str(directory / "tokenized"))
        raw = datasets.load_from_disk(str(directory / "raw"))
        stats = {name: SplitStats(**values) for name, values in meta["stats"].items()}
        for name, split in tokenized.items():  # the lengths of every row: a cheap look at the whole table
            tokens = pc.sum(pc.list_value_length(split.data.column("input_ids"))).as_py() or 0
            if (len(split), tokens) != (stats[name].rows, stats[name].tokens):
                raise ValueError(f"the {name} split holds other rows than {PREPARED_META} records")
    except Exception as exc:  # the prepared data is a cache: whatever is wrong with it, rebuild it
        log.warning("Prepared data in %s is damaged (%s: %s); tokenizing again", directory, type(exc).__name__, exc)
        return None
    return PreparedData(
        meta["format"],
        tokenized["train"],
        tokenized.get("validation"),
        tokenized.get("test"),
        dict(raw),
        stats,
    )


def prepare_or_load(cfg: DatasetConfig, tokenizer: Any) -> PreparedData:
    """Reuse the prepared data in dataset.preparedDir when it matches; otherwise prepare and save it there."""
    if not cfg.prepared_dir:
        return prepare(cfg, tokenizer)
    directory = Path(cfg.prepared_dir)
    check_prepared_dir(directory, cfg)
    for path, setting in (
        (cfg.path, "dataset.path"),
        (cfg.validation_path, "dataset.validationPath"),
        (cfg.test_path, "dataset.testPath"),
    ):
        if path:
            check_data_file(path, setting)
    fingerprint = data_fingerprint(cfg, tokenizer)
    loaded = load_prepared(directory, fingerprint)
    if loaded is not None:
        log.info("Using the prepared data in %s", directory)
        return loaded
    data = prepare(cfg, tokenizer)
    save_prepared(data, directory, fingerprint)
    log.info("Saved the prepared data to %s", directory)
    return data


# --------------------------------------------------------------------------- batching


class EpochSeededSampler(torch.utils.data.Sampler[int]):
    """Shuffles (or length-groups) with a generator seeded by (seed, epoch).

    transformers' LengthGroupedSampler draws from the global torch RNG when an epoch
    starts, so a run resumed inside a later epoch would replay a different order and
    skip the wrong batches. Here every epoch's order is a pure function of the seed.
    """

    def __init__(self, size: int, seed: int, lengths: list[int] | None = None, batch_size: int = 1) -> None:
        self.size = size
        self.seed = seed
        self.lengths = lengths
        self.batch_size = batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.lengths is not None:
            return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))
        return iter(torch.randperm(self.size, generator=generator).tolist())


@dataclass
class PaddingCollator:
    """Right-pads a batch to its longest sample (rounded up to a multiple for tensor cores).

    Labels are padded with -100 by position, so no target is ever masked because its
    token id happens to equal the pad id.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = math.ceil(longest / self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(features)
        input_ids = torch.full((batch, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, longest), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[row, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.as_tensor(f["labels"], dtype=torch.long)
            attention_mask[row, :n] = 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        if "index" in features[0]:
            batch["sample_index"] = torch.tensor([f["index"] for f in features], dtype=torch.long)
        return batch
