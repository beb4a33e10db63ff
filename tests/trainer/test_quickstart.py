"""The quickstart's pieces: QA pairs from records, its working directory, its score."""

from __future__ import annotations

import pytest

from kubetune_trainer.errors import ConfigError, DataError
from kubetune_trainer.qa import QATemplate, render_pairs
from kubetune_trainer.quickstart import MARKER, branch_records, char_similarity, claim_workdir

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


def test_branch_records_are_deterministic_with_distinct_codes():
    records = branch_records(40)
    assert records == branch_records(40)
    assert len({r["routing_code"] for r in records}) == len({r["branch"] for r in records}) == 40
    assert all(len(r["routing_code"]) == 9 for r in records)


@pytest.mark.parametrize(
    ("a", "b", "expected"), [("123", "123", 1.0), ("", "", 1.0), ("123", "124", 2 / 3), ("abc", "", 0.0)]
)
def test_char_similarity(a, b, expected):
    assert char_similarity(a, b) == pytest.approx(expected)


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
