"""Question/answer pairs from tabular records, in the prompt/completion format.

A template names a question type (exact lookup, paraphrase, reverse lookup, natural
request) and gives a question and an answer with ``{field}`` placeholders filled from
each record.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from kubetune_trainer.errors import DataError

PROMPT_FORMAT = "Question: {question}\nAnswer:"


@dataclass(frozen=True)
class QATemplate:
    kind: str
    question: str
    answer: str

    def fields(self) -> set[str]:
        return {
            name for text in (self.question, self.answer) for _, name, _, _ in string.Formatter().parse(text) if name
        }


def render_pairs(
    records: Sequence[Mapping[str, object]], templates: Iterable[QATemplate], source: str = "records"
) -> list[dict[str, str]]:
    """One pair per record and template, duplicates removed, in a stable order."""
    templates = list(templates)
    columns = set(records[0]) if records else set()
    for t in templates:
        missing = t.fields() - columns
        if missing:
            raise DataError(
                f"template {t.kind!r} uses field(s) {', '.join(sorted(missing))} that {source} lacks "
                f"(it has {', '.join(sorted(columns))}). Fix the template or add the column."
            )
    seen: set[tuple[str, str]] = set()
    pairs = []
    for record in records:
        values = {k: str(v) for k, v in record.items()}
        for t in templates:
            prompt = PROMPT_FORMAT.format(question=t.question.format(**values))
            completion = " " + t.answer.format(**values)
            if (prompt, completion) in seen:
                continue
            seen.add((prompt, completion))
            pairs.append({"prompt": prompt, "completion": completion, "kind": t.kind})
    return pairs
