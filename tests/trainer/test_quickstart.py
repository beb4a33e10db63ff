"""The quickstart's pieces: QA pairs from records (make-qa), its working directory."""

from __future__ import annotations

import collections
import json

import pytest

from kubetune_trainer.errors import ConfigError, DataError
from kubetune_trainer.qa import (
    MARKER as QA_MARKER,
)
from kubetune_trainer.qa import (
    QATemplate,
    ambiguous_questions,
    apportion,
    load_template_file,
    make_qa,
    read_records,
    render_pairs,
    split_pairs,
)
from kubetune_trainer.quickstart import (
    BRANCH_TEMPLATES,
    BRANCHES,
    MARKER,
    branch_records,
    claim_workdir,
    write_templates,
)
from kubetune_trainer.quickstart import main as quickstart_main

RECORDS = [{"branch": "Oak Plaza", "routing_code": "123456789"}, {"branch": "Elm Street", "routing_code": "987654321"}]


def test_pairs_fill_every_template_for_every_record():
    templates = [
        QATemplate("exact", "Code of {branch}?", "{routing_code}"),
        QATemplate("reverse", "Who has {routing_code}?", "{branch}"),
    ]
    pairs = render_pairs(RECORDS, templates)
    assert pairs[0] == {"prompt": "Question: Code of Oak Plaza?\nAnswer:", "completion": " 123456789", "kind": "exact"}
    assert [p["kind"] for p in pairs] == ["exact", "reverse", "exact", "reverse"]


def test_duplicate_pairs_are_dropped():
    templates = [QATemplate("a", "Code of {branch}?", "{routing_code}")] * 2
    assert len(render_pairs(RECORDS * 2, templates)) == 2


def test_a_template_field_missing_from_the_records_is_named():
    with pytest.raises(DataError, match=r"template 'natural' uses field\(s\) city that branches.csv lacks"):
        render_pairs(RECORDS, [QATemplate("natural", "{branch} in {city}?", "{routing_code}")], source="branches.csv")


NATURAL = QATemplate("natural", "Where in {city} is {branch}?", "{routing_code}")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        # JSONL records need not share keys: the third lacks "city", which only the template uses.
        (
            "r.jsonl",
            '{"branch": "Oak", "city": "Ash", "routing_code": "1"}\n\n{"branch": "Elm", "routing_code": "2"}\n',
            r"r\.jsonl:3: field 'city' is missing, and template 'natural' uses it\. Add it to that record",
        ),
        ("r.jsonl", '{"branch": "Oak", "city": null, "routing_code": "1"}\n', r"r\.jsonl:1: field 'city' is empty"),
        # An empty cell would give an empty question part or answer; the second record starts on line 4.
        (
            "r.csv",
            'branch,city,routing_code\n"Oak\nPlaza",Ash,1\nElm,,2\nPine, ,3\n',
            r"r\.csv:4: field 'city' is empty, and template 'natural' uses it \(1 more such values",
        ),
    ],
)
def test_a_record_missing_or_emptying_a_used_field_is_named_with_file_and_line(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    records, locations = read_records(tmp_path / name)
    with pytest.raises(DataError, match=message):
        render_pairs(records, [NATURAL], source=name, locations=locations)


def test_records_know_the_line_they_start_on(tmp_path):
    (tmp_path / "r.csv").write_text('branch,note\n"Oak\nPlaza",x\n\nElm,y\n')
    assert read_records(tmp_path / "r.csv") == ([{"branch": "Oak\nPlaza", "note": "x"}, {"branch": "Elm", "note": "y"}],
                                                [f"{tmp_path / 'r.csv'}:2", f"{tmp_path / 'r.csv'}:5"])  # fmt: skip
    # A field no template uses may be empty or absent.
    pairs = render_pairs([{"branch": "Oak", "routing_code": "1", "city": ""}, {"branch": "Elm", "routing_code": "2"}],
                         [QATemplate("exact", "Code of {branch}?", "{routing_code}")])  # fmt: skip
    assert len(pairs) == 2


def test_branch_records_are_deterministic_with_distinct_codes():
    records = branch_records(40)
    assert records == branch_records(40)
    assert len({r["routing_code"] for r in records}) == len({r["branch"] for r in records}) == 40
    assert all(len(r["routing_code"]) == 9 for r in records)


def test_the_split_never_puts_one_question_in_two_splits():
    # Two branches share a city code: the reverse question "who has code X" has two answers.
    records = [*branch_records(30), {"branch": "Twin Plaza", "city": "Lakeside", "routing_code": "123123123"}]
    records.append({"branch": "Twin Street", "city": "Lakeside", "routing_code": "123123123"})
    pairs = render_pairs(records, BRANCH_TEMPLATES)
    splits = split_pairs(pairs, 0.2, 0.2, seed=3)
    prompts = {name: {p["prompt"] for p in rows} for name, rows in splits.items()}
    assert not prompts["train"] & prompts["test"] and not prompts["train"] & prompts["validation"]
    assert not prompts["validation"] & prompts["test"]
    assert sum(map(len, splits.values())) == len(pairs), "every pair lands in exactly one split"
    assert {p["kind"] for p in splits["test"]} == {t.kind for t in BRANCH_TEMPLATES}, "each type in each split"
    assert splits == split_pairs(pairs, 0.2, 0.2, seed=3), "deterministic for a seed"
    assert splits != split_pairs(pairs, 0.2, 0.2, seed=4)
    assert ambiguous_questions(pairs) == ["Question: Which branch has routing code 123123123?\nAnswer:"]


def test_each_question_type_gets_its_share_of_every_split_however_unequal_the_types():
    pairs = [{"prompt": f"big {i}?", "completion": " a", "kind": "big"} for i in range(100)]
    pairs += [{"prompt": f"small {i}?", "completion": " b", "kind": "small"} for i in range(10)]
    pairs.append({"prompt": "small 0?", "completion": " c", "kind": "small"})  # a second answer: same split
    splits = split_pairs(pairs, 0.1, 0.1, seed=7)
    questions = {
        name: collections.Counter(kind for kind, _ in {(p["kind"], p["prompt"]) for p in rows})
        for name, rows in splits.items()
    }
    # 10% of each type's questions, not 11 of all 110 dealt to the types in turn (which left
    # {big: 88, small: 0} for training).
    assert questions == {
        "train": {"big": 80, "small": 8},
        "validation": {"big": 10, "small": 1},
        "test": {"big": 10, "small": 1},
    }
    where = collections.defaultdict(set)
    for name, rows in splits.items():
        for p in rows:
            where[p["prompt"]].add(name)
    assert len(where) == 110 and all(len(names) == 1 for names in where.values()), "one question, one split"
    assert sum(map(len, splits.values())) == len(pairs), "every pair lands in exactly one split"
    assert splits == split_pairs(pairs, 0.1, 0.1, seed=7), "deterministic for a seed"
    assert splits != split_pairs(pairs, 0.1, 0.1, seed=8)


def test_apportion_is_largest_remainder_with_ties_to_the_split_furthest_behind():
    shares = {"validation": 0.25, "test": 0.25, "train": 0.5}
    none_behind = dict.fromkeys(("validation", "test", "train"), 0.0)
    # 7 x (0.25, 0.25, 0.5) = 1.75, 1.75, 3.5: floors 1, 1, 3; the 2 left go to the remainders .75 and .75.
    assert apportion(7, shares, none_behind) == {"validation": 2, "test": 2, "train": 3}
    # 2 -> 0.5, 0.5, 1: one left, a tie of remainders: test first, unless validation is further behind.
    assert apportion(2, shares, none_behind) == {"validation": 0, "test": 1, "train": 1}
    assert apportion(2, shares, {**none_behind, "validation": 0.5}) == {"validation": 1, "test": 0, "train": 1}
    # Float noise (1 - 0.1 - 0.2 = 0.6999...) does not lose a question.
    assert apportion(10, {"validation": 0.1, "test": 0.2, "train": 1 - 0.1 - 0.2}, none_behind) == {
        "validation": 1, "test": 2, "train": 7,
    }  # fmt: skip


def test_make_qa_writes_splits_from_a_csv_and_a_template_file(tmp_path):
    records = tmp_path / "branches.csv"
    records.write_text("branch,city,routing_code\nOak Plaza,Ashland,012345678\nElm Street,Riverton,987654321\n")
    made = make_qa(records, write_templates(tmp_path / "templates.yaml"), tmp_path / "qa", validation=0.25, test=0.25)
    rows = {
        n: [json.loads(x) for x in (tmp_path / "qa" / f"{n}.jsonl").open()] for n in ("train", "validation", "test")
    }
    assert sum(map(len, rows.values())) == 8 == sum(made.counts.values())
    every = [r for split in rows.values() for r in split]
    exact = {
        "prompt": "Question: What is the routing code of the Oak Plaza branch?\nAnswer:",
        "completion": " 012345678",
    }
    assert {**exact, "kind": "exact"} in every, "values stay text: the leading zero is kept"
    assert made.dataset_config() == {
        "path": str(tmp_path / "qa" / "train.jsonl"),
        "validationPath": str(tmp_path / "qa" / "validation.jsonl"),
        "testPath": str(tmp_path / "qa" / "test.jsonl"),
    }
    # Rerunning replaces its own files; files it did not write are never replaced.
    make_qa(records, tmp_path / "templates.yaml", tmp_path / "qa", validation=0.25, test=0.25)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "train.jsonl").write_text("mine\n")
    with pytest.raises(ConfigError, match="not written by make-qa"):
        make_qa(records, tmp_path / "templates.yaml", tmp_path / "other")
    assert (tmp_path / "other" / "train.jsonl").read_text() == "mine\n"
    assert not (tmp_path / "other" / QA_MARKER).exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("templates:\n  - kind: exact\n    question: Q {branch}?\n", r"line 2, templates\.0\.answer: required"),
        ("templates:\n  - kind: exact\n    question: Q?\n    anser: A\n", r"line 4, templates\.0\.anser: unknown"),
        ("templates: [\n", r"templates.yaml:2: not valid YAML"),
        ("promptFormat: 'Q: {q}'\ntemplates: [{kind: a, question: x, answer: y}]\n", "must contain {question}"),
        ("promptFormat: 'Q: {question} {ctx}'\ntemplates: [{kind: a, question: x, answer: y}]\n", "'ctx'"),
        ("templates: [{kind: a, question: 'Code of {branch}?', answer: '{code:05d}'}]\n", "'a': Unknown format"),
        ("templates: [{kind: a, question: '{branch!z}', answer: '{code}'}]\n", "template 'a': Unknown conversion"),
    ],
)
def test_a_bad_template_file_is_named_with_its_line(tmp_path, text, message):
    path = tmp_path / "templates.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_template_file(path)


def test_a_malformed_placeholder_is_refused():
    with pytest.raises(ConfigError, match="template 'x'"):
        render_pairs(RECORDS, [QATemplate("x", "Code of {branch?", "{routing_code}")])


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("r.csv", "branch,routing_code\nOak,1,extra\n", r"r.csv:2: 3 values, but the header \(\S+r.csv:1\) names 2"),
        ("r.csv", "branch,code,branch\nOak,1,Elm\n", r"r.csv:1: the header names column 'branch' twice"),
        ("r.csv", "branch,routing_code\n", "holds no records"),
        ("r.jsonl", '{"branch": "Oak"}\n{"branch": \n', r"RECORDS: \S+r.jsonl:2: invalid JSON"),
        ("r.jsonl", '["Oak"]\n', r"r.jsonl: element 0 of the array is not an object"),
        ("r.jsonl", '{"branch": "Oak"}\n"Elm"\n', r"r.jsonl:2: expected a JSON object per line, found str"),
        ("r.txt", "x", "unknown file type .txt"),
    ],
)
def test_bad_records_are_named_with_file_and_line(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=message):
        read_records(tmp_path / name)


def test_quickstart_refuses_a_directory_it_did_not_make(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="was not made by `kubetune-train quickstart`"):
        claim_workdir(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_quickstart_starts_over_in_its_own_directory(tmp_path):
    claim_workdir(tmp_path)
    assert (tmp_path / MARKER).exists()
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "adapter_model.safetensors").write_bytes(b"old")
    (tmp_path / "notes.txt").write_text("mine")
    claim_workdir(tmp_path)
    assert not (tmp_path / "output").exists()
    assert (tmp_path / "notes.txt").exists(), "only the quickstart's own outputs are replaced"


def test_records_that_are_not_utf8_and_an_out_that_is_a_file_are_named(tmp_path):
    records = tmp_path / "branches.csv"
    records.write_bytes("branch,routing_code\nOak Plaza,012345678\nBäckerstraße,987654321\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"RECORDS: .*branches.csv:3: not UTF-8 text .*Save the file as UTF-8"):
        read_records(records)
    records.write_text("branch,routing_code\nOak Plaza,012345678\n")
    (tmp_path / "taken").write_text("mine")
    with pytest.raises(ConfigError, match=r"--out .*taken is a file"):
        make_qa(records, write_templates(tmp_path / "t.yaml", BRANCH_TEMPLATES[:1]), tmp_path / "taken")
    assert (tmp_path / "taken").read_text() == "mine"


@pytest.mark.parametrize("branches", [BRANCHES.start - 1, BRANCHES.stop])
def test_quickstart_refuses_a_branch_count_it_cannot_split_or_name(tmp_path, branches):
    with pytest.raises(ConfigError, match=rf"--branches {branches}: the quickstart makes 10 to 48"):
        quickstart_main(tmp_path / "qs", max_steps=1, branches=branches, samples=0)
    assert not (tmp_path / "qs").exists(), "refused before anything is written"


@pytest.mark.parametrize("branches", [BRANCHES.start, BRANCHES.stop - 1])
def test_every_allowed_branch_count_has_every_split_and_distinct_names(tmp_path, branches):
    records = branch_records(branches)
    assert len({r["branch"] for r in records}) == branches
    path = tmp_path / "b.csv"
    rows = [",".join(r.values()) for r in records]
    path.write_text("\n".join([",".join(records[0]), *rows]) + "\n")
    made = make_qa(path, write_templates(tmp_path / "t.yaml"), tmp_path / "qa", seed=0)
    assert all(made.counts.values()), made.counts
