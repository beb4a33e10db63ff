"""Data: formats, label masks, truncation, splits and the errors for bad files."""

from __future__ import annotations

import copy
import csv
import json
import os
from contextlib import contextmanager

import pytest

from kubetune_trainer.config import DatasetConfig
from kubetune_trainer.data import (
    IGNORE_INDEX,
    PaddingCollator,
    detect_format,
    load_splits,
    prepare,
    split_indices,
    split_sizes,
    tokenize_chat,
    tokenize_prompt_completion,
    tokenize_text,
)
from kubetune_trainer.errors import ConfigError, DataError
from tests.conftest import write_jsonl

CHAT = [
    {"role": "system", "content": "You answer routing questions."},
    {"role": "user", "content": "Routing code of Oak Plaza?"},
    {"role": "assistant", "content": "123456789"},
    {"role": "user", "content": "And Elm Street?"},
    {"role": "assistant", "content": "987654321"},
]


def targets(ids, labels):
    return [t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]


def test_tiny_tokenizer_pads_with_eos(tokenizer):
    # The case where collators that mask labels by pad id silently stop teaching EOS.
    assert tokenizer.pad_token_id == tokenizer.eos_token_id


def test_prompt_completion_masks_the_prompt_and_keeps_eos(tokenizer):
    (ids,), (labels,) = tokenize_prompt_completion(
        ["Question: Where?\nAnswer:"], [" Oak Plaza"], tokenizer, train_on_prompt=False
    )
    prompt_len = len(tokenizer("Question: Where?\nAnswer:")["input_ids"])
    assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert tokenizer.decode(targets(ids, labels)[:-1]) == " Oak Plaza"
    assert ids[-1] == labels[-1] == tokenizer.eos_token_id


def test_train_on_prompt_labels_everything(tokenizer):
    (ids,), (labels,) = tokenize_prompt_completion(["Q: x\nA:"], [" y"], tokenizer, train_on_prompt=True)
    assert labels == ids


def test_text_format_learns_every_token_and_eos(tokenizer):
    (ids,), (labels,) = tokenize_text(["Maple Street is in Springfield."], tokenizer)
    assert labels == ids
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[:-1]) == "Maple Street is in Springfield."


def test_chat_applies_the_template_and_learns_only_assistant_turns(tokenizer):
    (ids,), (labels,) = tokenize_chat([CHAT], tokenizer, train_on_prompt=False)
    text = tokenizer.decode(ids)
    assert text == tokenizer.apply_chat_template(CHAT, tokenize=False) + tokenizer.eos_token
    assert text.startswith("<|im_start|>system\nYou answer routing questions.<|im_end|>")
    learned = tokenizer.decode(targets(ids, labels))
    # Both assistant answers with their end-of-turn marker, then the EOS that ends generation (this
    # template's <|im_end|> is not the tokenizer's EOS); nothing of the system or user turns.
    assert tokenizer.eos_token == "<|endoftext|>"
    assert learned == "123456789<|im_end|>\n987654321<|im_end|>\n<|endoftext|>"
    assert ids[-1] == labels[-1] == tokenizer.eos_token_id


def test_chat_turns_a_template_rewrites_later_are_left_out(tokenizer):
    """A template that hides earlier assistant turns (as reasoning templates do) must not mislabel them."""
    original = tokenizer.chat_template
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
        "{{ '<|im_start|>assistant\n...<|im_end|>\n' }}"
        "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    try:
        (ids,), (labels,) = tokenize_chat([CHAT], tokenizer, train_on_prompt=False)
    finally:
        tokenizer.chat_template = original
    assert tokenizer.decode(targets(ids, labels)) == "987654321<|im_end|>\n<|endoftext|>"


@contextmanager
def chat_template(tokenizer, template):
    original = tokenizer.chat_template
    tokenizer.chat_template = template
    try:
        yield
    finally:
        tokenizer.chat_template = original


def test_chat_gets_no_second_eos_when_the_template_ends_turns_with_it(tokenizer):
    # As Llama 3 and Qwen instruct models do: the end-of-turn marker is the EOS.
    template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|endoftext|>' + '\n' }}{% endfor %}"
    with chat_template(tokenizer, template):
        (ids,), (labels,) = tokenize_chat([CHAT], tokenizer, train_on_prompt=False)
    assert ids.count(tokenizer.eos_token_id) == 5  # one per turn, none added
    assert tokenizer.decode(targets(ids, labels)).endswith("987654321<|endoftext|>\n")


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_chat_ending_with_a_user_turn_gets_no_eos(tokenizer, train_on_prompt):
    (ids,), (labels,) = tokenize_chat([CHAT[:4]], tokenizer, train_on_prompt=train_on_prompt)
    assert tokenizer.eos_token_id not in ids
    assert tokenizer.decode(targets(ids, labels)) == (
        tokenizer.decode(ids) if train_on_prompt else "123456789<|im_end|>\n"
    )


def test_chat_trained_on_prompt_learns_the_eos_too(tokenizer):
    (ids,), (labels,) = tokenize_chat([CHAT], tokenizer, train_on_prompt=True)
    assert labels == ids and ids[-1] == tokenizer.eos_token_id and ids.count(tokenizer.eos_token_id) == 1


@pytest.fixture
def eos_adding_tokenizer(tokenizer):
    """The tiny tokenizer made to append EOS itself, as tokenizers with add_eos_token=True do."""
    from tokenizers.processors import TemplateProcessing

    adding = copy.deepcopy(tokenizer)
    eos = tokenizer.eos_token
    adding.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"$A {eos}", special_tokens=[(eos, tokenizer.eos_token_id)]
    )
    assert adding("Oak Plaza")["input_ids"][-1] == tokenizer.eos_token_id  # the premise
    return adding


def test_text_gets_one_eos_when_the_tokenizer_adds_it(eos_adding_tokenizer):
    (ids,), (labels,) = tokenize_text(["Maple Street is in Springfield."], eos_adding_tokenizer)
    assert ids.count(eos_adding_tokenizer.eos_token_id) == 1 and ids[-1] == eos_adding_tokenizer.eos_token_id
    assert labels == ids


def test_text_and_completions_that_end_with_eos_get_no_second(tokenizer):
    eos = tokenizer.eos_token
    (ids,), _ = tokenize_text([f"Maple Street.{eos}"], tokenizer)
    assert ids.count(tokenizer.eos_token_id) == 1 and ids[-1] == tokenizer.eos_token_id
    (ids,), (labels,) = tokenize_prompt_completion(["Q: x\nA:"], [f" y{eos}"], tokenizer, train_on_prompt=False)
    assert ids.count(tokenizer.eos_token_id) == 1 and labels[-1] == tokenizer.eos_token_id


def test_collator_pads_by_position_so_eos_stays_a_target(tokenizer):
    eos = tokenizer.eos_token_id
    batch = PaddingCollator(pad_token_id=eos)(
        [
            {"input_ids": [5, 6, eos], "labels": [IGNORE_INDEX, 6, eos]},
            {"input_ids": [7, eos], "labels": [7, eos]},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, eos], [7, eos, eos]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, eos], [7, eos, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_collator_rounds_length_up_for_tensor_cores():
    batch = PaddingCollator(pad_token_id=0, pad_to_multiple_of=8)([{"input_ids": [1] * 9, "labels": [1] * 9}])
    assert batch["input_ids"].shape == (1, 16)
    assert batch["labels"][0, 9:].eq(IGNORE_INDEX).all()


@pytest.mark.parametrize(
    ("n", "val", "test", "expected"),
    [(100, 0.1, 0.1, (80, 10, 10)), (10, 0.1, 0.1, (8, 1, 1)), (5, 0.1, 0.1, (3, 1, 1)), (4, 0.1, 0, (4, 0, 0))],
)
def test_split_sizes(n, val, test, expected):
    assert split_sizes(n, val, test) == expected


def test_split_is_deterministic_disjoint_and_complete():
    a = split_indices(200, 0.1, 0.1, seed=42)
    assert a == split_indices(200, 0.1, 0.1, seed=42)
    assert a != split_indices(200, 0.1, 0.1, seed=43)
    parts = [set(a["train"]), set(a["validation"]), set(a["test"])]
    assert sum(map(len, parts)) == 200 and set().union(*parts) == set(range(200))
    assert [len(p) for p in parts] == [160, 20, 20]


def test_prepare_reports_truncation_and_drops_samples_without_targets(tmp_path, tokenizer):
    rows = [{"prompt": "Question: " + "very long " * 40, "completion": " 42"}] * 2 + [
        {"prompt": "Q: short?\nA:", "completion": " yes " * 30}
    ] * 8
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    cfg = DatasetConfig(path=str(path), max_seq_length=16, validation_split=0, test_split=0)
    data = prepare(cfg, tokenizer)
    stats = data.stats["train"]
    assert stats.truncated == 10  # all rows exceed 16 tokens
    assert stats.dropped == 2  # the long prompts leave no completion token
    assert stats.rows == len(data.train) == 8
    assert max(data.train["length"]) == 16


@pytest.mark.parametrize("suffix", ["csv", "parquet", "jsonl"])
def test_reads_csv_parquet_and_jsonl(tmp_path, tokenizer, qa_rows, suffix):
    import datasets

    path = tmp_path / f"data.{suffix}"
    rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in qa_rows]
    datasets.Dataset.from_list(rows).to_csv(path, index=False) if suffix == "csv" else None
    datasets.Dataset.from_list(rows).to_parquet(path) if suffix == "parquet" else None
    write_jsonl(path, rows) if suffix == "jsonl" else None
    data = prepare(DatasetConfig(path=str(path)), tokenizer)
    assert data.format == "prompt_completion"
    assert len(data.train) + len(data.validation) + len(data.test) == len(rows)


def test_format_detection(tmp_path):
    cfg = DatasetConfig(path="x.jsonl")
    assert detect_format(["prompt", "completion", "id"], cfg, "x") == "prompt_completion"
    assert detect_format(["messages"], cfg, "x") == "chat"
    assert detect_format(["text"], cfg, "x") == "text"
    custom = DatasetConfig(path="x.jsonl", prompt_field="question", completion_field="answer")
    assert detect_format(["question", "answer"], custom, "x") == "prompt_completion"


# ----------------------------------------------------------------------------- bad input


def _error(cfg: DatasetConfig) -> str:
    with pytest.raises(DataError) as err:
        load_splits(cfg)
    return str(err.value)


def test_missing_field_names_file_and_line(tmp_path, qa_rows):
    rows = [dict(r) for r in qa_rows[:20]]
    del rows[6]["completion"]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows[:3]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[3:]))
    message = _error(DatasetConfig(path=str(path)))
    # Row 6 sits on line 8: three rows, a blank line, then rows 3..
    assert f"{path}:8: field 'completion' is missing" in message
    assert "Fix or remove that row" in message


def test_every_bad_row_is_counted_and_the_first_ones_named(tmp_path, qa_rows):
    rows = [dict(r) for r in qa_rows[:20]]
    for i in (2, 5, 9, 11, 15):
        rows[i]["completion"] = "" if i % 2 else None
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    message = _error(DatasetConfig(path=str(path)))
    assert "dataset.path: 5 of 20 rows cannot be trained on" in message
    assert f"{path}:3: " in message and f"{path}:6: " in message and f"{path}:10: " in message
    assert "and 2 more" in message and f"{path}:12:" not in message


def test_missing_field_in_csv_names_the_line(tmp_path, qa_rows):
    path = tmp_path / "d.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["prompt", "completion"])
        writer.writerow(["multi\nline prompt", " a"])  # a quoted newline: row 1 spans lines 2-3
        writer.writerow(["p", ""])
        for r in qa_rows[:10]:
            writer.writerow([r["prompt"], r["completion"]])
    message = _error(DatasetConfig(path=str(path)))
    assert f"{path}:4: field 'completion'" in message


def test_invalid_json_line(tmp_path, qa_rows):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(qa_rows[0]) + "\n" + '{"prompt": "x", "completion": \n')
    assert f"{path}:2: invalid JSON" in _error(DatasetConfig(path=str(path)))


def test_wrong_type(tmp_path, qa_rows):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": 5}] * 12)
    assert "field 'completion' must be a string, found int" in _error(DatasetConfig(path=str(path)))


ROUTING = [{"prompt": f"Routing code of branch {i}?", "completion": f" 4998588{i:02d}"} for i in range(100)]


@pytest.mark.parametrize(("line", "value", "found"), [(51, 499858816, "int"), (71, ["a"], "list"), (2, None, "")])
def test_a_wrong_type_names_its_own_line_and_type(tmp_path, line, value, found):
    """One non-string used to turn the column into datasets' Json feature: every " 4998588.." string read
    back as an int, and the error named line 1 and the wrong type."""
    rows = [dict(r) for r in ROUTING]
    rows[line - 1]["completion"] = value
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    message = _error(DatasetConfig(path=str(path)))
    problem = f"must be a string, found {found}" if found else "is missing"
    assert f"{path}:{line}: field 'completion' {problem}. Fix or remove that row" in message


def test_a_wrong_type_in_a_json_array_names_the_element(tmp_path):
    rows = [dict(r) for r in ROUTING]
    rows[40]["prompt"] = 7
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows, indent=1))
    assert f"{path}: element 40: field 'prompt' must be a string, found int" in _error(DatasetConfig(path=str(path)))


def test_valid_rows_keep_their_strings(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROUTING)
    _, raw = load_splits(DatasetConfig(path=str(path), validation_split=0, test_split=0))
    assert raw["train"]["completion"] == [r["completion"] for r in ROUTING]


def test_csv_is_read_as_text(tmp_path):
    """pandas would read these codes as ints (losing the zeros), 'NA' and 'None' as missing, '1.50' as 1.5."""
    answers = ["000123456", "NA", "None", "1.50", "  spaced  "]
    path = tmp_path / "codes.csv"
    with path.open("w", newline="", encoding="utf-8-sig") as fh:  # with the BOM that Excel writes
        writer = csv.writer(fh)
        writer.writerow(["prompt", "completion"])
        for i in range(4):
            writer.writerows([f"Q{i}-{n}", a] for n, a in enumerate(answers))
    _, raw = load_splits(DatasetConfig(path=str(path), validation_split=0, test_split=0))
    assert raw["train"].column_names == ["prompt", "completion"]
    assert raw["train"]["completion"][:5] == answers


def test_csv_with_a_pandas_index_column(tmp_path):
    import pandas

    path = tmp_path / "d.csv"
    pandas.DataFrame(ROUTING).to_csv(path)  # index=True: the header starts with an empty name
    fmt, raw = load_splits(DatasetConfig(path=str(path), validation_split=0, test_split=0))
    assert fmt == "prompt_completion" and raw["train"].column_names == ["Unnamed: 0", "prompt", "completion"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "{path} holds no rows"),
        ("\n\n", "{path} holds no rows"),
        ("prompt,completion\n", "{path} holds no rows"),
        ("prompt,completion\na,b\nc,d,e\nf,g\n", "{path}:3: 3 values, but the header ({path}:1) names 2 columns"),
        ("prompt,completion\na,b\n\nc\n", "{path}:4: 1 value, but the header"),
        ('prompt,completion\na,b\nc,"d\n', "{path}:3: not valid CSV"),
        ("prompt,prompt\na,b\n", "{path}:1: the header names column 'prompt' twice"),
    ],
    ids=["empty", "blank", "header-only", "extra-value", "missing-value", "open-quote", "duplicate-column"],
)
def test_bad_csv_names_file_and_line(tmp_path, text, expected):
    path = tmp_path / "d.csv"
    path.write_text(text)
    message = _error(DatasetConfig(path=str(path)))
    assert message.startswith("dataset.path: ") and expected.format(path=path) in message
    assert "An error occurred" not in message and "corresponds to no data" not in message


def test_a_truncated_parquet_file_is_named(tmp_path):
    import datasets

    good = tmp_path / "good.parquet"
    datasets.Dataset.from_list(ROUTING).to_parquet(good)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    message = _error(DatasetConfig(path=str(bad)))
    assert message.startswith(f"dataset.path: cannot read {bad}: ")
    assert "Check that the file is valid parquet" in message and "An error occurred" not in message


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([{"prompt": "p", "answer": "a"}] * 12, "cannot tell the data format from the columns 'prompt', 'answer'"),
        ([{"prompt": "p", "completion": "c"}] * 3 + [{"prompt": "p", "completion": None}] * 9, "row 3: field"),
    ],
    ids=["missing-column", "missing-value"],
)
def test_parquet_problems_name_the_column_and_row(tmp_path, rows, expected):
    import datasets

    path = tmp_path / "d.parquet"
    datasets.Dataset.from_list(rows).to_parquet(path)
    assert expected in _error(DatasetConfig(path=str(path)))


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_non_utf8_far_into_the_file_names_its_line(tmp_path, suffix):
    """The decoder reports an offset into its current chunk, not the file."""
    path = tmp_path / f"d.{suffix}"
    lines = [json.dumps({"prompt": f"p{i}", "completion": " c"}) for i in range(900)]
    if suffix == "csv":
        lines = ["prompt,completion", *[f"p{i},c" for i in range(899)]]
    raw = "\n".join(lines).encode().split(b"\n")
    raw[700] = raw[700].replace(b"p", b"caf\xe9 p", 1)
    path.write_bytes(b"\n".join(raw) + b"\n")
    assert f"{path}:701: not UTF-8 text" in _error(DatasetConfig(path=str(path)))


def test_unknown_columns_say_what_is_expected(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}] * 12)
    message = _error(DatasetConfig(path=str(path)))
    assert "'question', 'answer'" in message and "dataset.format" in message


def test_explicit_format_with_missing_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "completion": "a"}] * 12)
    assert "format chat needs column(s) 'messages'" in _error(DatasetConfig(path=str(path), format="chat"))


def test_chat_without_assistant_turn(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}] * 5 + [{"messages": CHAT[:2]}] * 5)
    assert f"{path}:6: no assistant message" in _error(DatasetConfig(path=str(path)))


def test_unsupported_extension_and_missing_file(tmp_path):
    (tmp_path / "d.txt").write_text("hello")
    assert "unsupported file type '.txt'" in _error(DatasetConfig(path=str(tmp_path / "d.txt")))
    assert "file not found" in _error(DatasetConfig(path=str(tmp_path / "nope.jsonl")))


def test_empty_split_says_how_to_fix_it(tmp_path, qa_rows):
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows[:4])
    message = _error(DatasetConfig(path=str(path)))
    assert "has 4 rows, so a 10% validation split is empty" in message
    assert "validationSplit: 0" in message


def test_empty_file(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n")
    assert "holds no rows" in _error(DatasetConfig(path=str(tmp_path / "d.jsonl")))


def test_validation_file_is_checked_like_the_training_file(tmp_path, qa_rows):
    train = write_jsonl(tmp_path / "train.jsonl", qa_rows[:20])
    val = write_jsonl(tmp_path / "val.jsonl", [{"prompt": "p"}])
    message = _error(DatasetConfig(path=str(train), validation_path=str(val)))
    assert message.startswith("dataset.validationPath:")
    assert "'completion'" in message


def test_non_utf8_data_names_the_line(tmp_path, qa_rows):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in qa_rows[:3]) + b'{"prompt": "caf\xe9"}\n')
    assert f"{path}:4: not UTF-8 text" in _error(DatasetConfig(path=str(path)))


def test_csv_blank_lines_do_not_shift_line_numbers(tmp_path, qa_rows):
    path = tmp_path / "d.csv"
    lines = ["prompt,completion", "a,b", "", "c,d", "e,", *[f"p{i},c{i}" for i in range(10)]]
    path.write_text("\n".join(lines) + "\n")
    assert f"{path}:5: field 'completion'" in _error(DatasetConfig(path=str(path)))


def test_chat_template_that_raises_is_a_data_error(tokenizer, tmp_path):
    original = tokenizer.chat_template
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    try:
        with pytest.raises(DataError, match=r"chat template rejects a conversation .*no system turns"):
            tokenize_chat([CHAT], tokenizer, train_on_prompt=False)
    finally:
        tokenizer.chat_template = original


def test_chat_rows_without_a_locatable_assistant_turn_are_named(tokenizer, tmp_path):
    original = tokenizer.chat_template
    # The generation prompt adds text the finished conversation does not have (as R1-style templates do).
    tokenizer.chat_template = original.replace("assistant\n'", "assistant\n<think>'")
    assert tokenizer.chat_template != original
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 12)
    try:
        with pytest.raises(DataError, match="no conversation whose assistant turns could be located"):
            prepare(DatasetConfig(path=str(path), validation_split=0, test_split=0), tokenizer)
    finally:
        tokenizer.chat_template = original


def test_prepared_dir_is_never_a_directory_with_other_files(tmp_path, qa_rows, tokenizer):
    from kubetune_trainer.data import prepare_or_load

    data = tmp_path / "data"
    data.mkdir()
    path = write_jsonl(data / "train.jsonl", qa_rows)
    (data / "README.txt").write_text("mine")
    with pytest.raises(DataError, match="contains the data files"):
        prepare_or_load(DatasetConfig(path=str(path), prepared_dir=str(data)), tokenizer)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="holds files that kubetune did not write"):
        prepare_or_load(DatasetConfig(path=str(path), prepared_dir=str(other)), tokenizer)
    assert (data / "README.txt").read_text() == "mine"
    assert (other / "notes.txt").read_text() == "mine"


def test_a_prepared_dir_that_is_a_file_is_refused_and_kept(tmp_path, qa_rows, tokenizer):
    from kubetune_trainer.data import prepare_or_load

    path = write_jsonl(tmp_path / "train.jsonl", qa_rows)
    before = path.read_bytes()
    with pytest.raises(DataError, match=r"dataset.preparedDir=.*train.jsonl is a file, not a directory"):
        prepare_or_load(DatasetConfig(path=str(path), prepared_dir=str(path)), tokenizer)
    assert path.read_bytes() == before, "the training data itself was pointed at: never replaced"
    blocker = tmp_path / "blocker"
    blocker.write_text("mine")
    with pytest.raises(ConfigError, match=r"dataset.preparedDir=.*blocker/prepared cannot be written") as failed:
        prepare_or_load(DatasetConfig(path=str(path), prepared_dir=str(blocker / "prepared")), tokenizer)
    assert failed.value.check == "disk.prepared" and not isinstance(failed.value, DataError), "exit 3, like disk.*"
    assert blocker.read_text() == "mine"
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        if os.access(read_only, os.W_OK):
            return  # root ignores permissions; the file in the way above is the same path through the code
        with pytest.raises(ConfigError, match=r"read-only/prepared cannot be written \(Permission denied\)"):
            prepare_or_load(DatasetConfig(path=str(path), prepared_dir=str(read_only / "prepared")), tokenizer)
    finally:
        read_only.chmod(0o755)


@pytest.mark.parametrize("damage", ["garbled meta", "truncated table", "missing table"])
def test_damaged_prepared_data_is_tokenized_again(tmp_path, qa_rows, tokenizer, damage, caplog):
    from kubetune_trainer.data import PREPARED_META, data_fingerprint, load_prepared, prepare_or_load

    path = write_jsonl(tmp_path / "train.jsonl", qa_rows)
    prepared = tmp_path / "prepared"
    cfg = DatasetConfig(path=str(path), prepared_dir=str(prepared))
    first = prepare_or_load(cfg, tokenizer)
    (table,) = (prepared / "tokenized" / "train").glob("*.arrow")
    if damage == "garbled meta":
        (prepared / PREPARED_META).write_text('{"fingerprint": ')
    elif damage == "truncated table":
        os.truncate(table, table.stat().st_size // 2)
    else:
        table.unlink()
    assert load_prepared(prepared, data_fingerprint(cfg, tokenizer)) is None
    assert "is damaged" in caplog.text
    again = prepare_or_load(cfg, tokenizer)  # rebuilt, and whole again
    assert again.train["input_ids"] == first.train["input_ids"]
    assert load_prepared(prepared, data_fingerprint(cfg, tokenizer)) is not None


def test_prepared_data_is_reused_only_while_files_and_tokenizer_match(tmp_path, qa_rows, tokenizer):
    from kubetune_trainer.data import data_fingerprint, load_prepared, prepare_or_load

    path = write_jsonl(tmp_path / "train.jsonl", qa_rows)
    cfg = DatasetConfig(path=str(path), prepared_dir=str(tmp_path / "prepared"))
    first = prepare_or_load(cfg, tokenizer)
    again = load_prepared(tmp_path / "prepared", data_fingerprint(cfg, tokenizer))
    assert again is not None
    assert again.train["input_ids"] == first.train["input_ids"]
    assert again.stats == first.stats
    before = data_fingerprint(cfg, tokenizer)
    original = tokenizer.chat_template
    tokenizer.chat_template = original + " "  # a tokenizer that renders chats differently
    try:
        assert data_fingerprint(cfg, tokenizer) != before
    finally:
        tokenizer.chat_template = original
    assert data_fingerprint(cfg, tokenizer) == before
    path.write_text(path.read_text().replace("Oak", "Ash", 1))  # same size, other content
    assert load_prepared(tmp_path / "prepared", data_fingerprint(cfg, tokenizer)) is None


def test_a_missing_file_is_a_data_error_with_prepared_dir_too(tmp_path, tokenizer):
    from kubetune_trainer.data import prepare_or_load

    cfg = DatasetConfig(path=str(tmp_path / "nope.jsonl"), prepared_dir=str(tmp_path / "prepared"))
    with pytest.raises(DataError, match="file not found"):
        prepare_or_load(cfg, tokenizer)


def test_a_directory_as_the_data_file_is_named_as_such(tmp_path, tokenizer):
    from kubetune_trainer.data import prepare_or_load

    (tmp_path / "train.jsonl").mkdir()
    cfg = DatasetConfig(path=str(tmp_path / "train.jsonl"))
    with pytest.raises(DataError, match=r"dataset.path: .*train.jsonl is a directory; name the data file in it"):
        prepare_or_load(cfg, tokenizer)
