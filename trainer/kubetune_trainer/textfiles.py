"""Reading text files row by row with errors that name the file and line: CSV records (a quoted value may
span lines), JSON Lines objects, and text that is not UTF-8. Shared by the trainer's data reader and
`make-qa`; stdlib only."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kubetune_trainer.errors import DataError


def not_utf8(file: Path, setting: str, exc: UnicodeDecodeError) -> DataError:
    # exc.start counts from the decoder's current chunk, not the file: find the line by decoding each.
    with file.open("rb") as fh:
        line = next((n for n, raw in enumerate(fh, start=1) if not decodes(raw)), 1)
    return DataError(f"{setting}: {file}:{line}: not UTF-8 text ({exc.reason}). Save the file as UTF-8.")


def decodes(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def csv_records(file: Path, setting: str) -> Iterator[tuple[int, list[str]]]:
    """(first line, fields) of each CSV record, the header first. Blank lines are not records;
    a quoted value may span lines, so a record's line is where it starts."""
    try:
        with file.open(encoding="utf-8-sig", newline="") as fh:  # -sig: Excel starts its CSVs with a BOM
            reader = csv.reader(fh, strict=True)
            start = 1
            try:
                for fields in reader:
                    if len(fields) > 1 or (fields and fields[0].strip()):
                        yield start, fields
                    start = reader.line_num + 1
            except csv.Error as exc:
                raise DataError(
                    f"{setting}: {file}:{start}: not valid CSV ({exc}). Put values that hold commas, quotes or "
                    'line breaks in double quotes, with inner quotes doubled ("say ""hi""").'
                ) from None
    except UnicodeDecodeError as exc:
        raise not_utf8(file, setting, exc) from None


def csv_table(file: Path, setting: str) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """The header's column names and the (line, fields) of each row below it; ([], no rows) for an empty file.

    A header cell left empty is named as pandas names it ('Unnamed: 0', the index column of
    DataFrame.to_csv()); a name given twice, or a row with another number of values, is a DataError."""
    records = csv_records(file, setting)
    first = next(records, None)
    if first is None:
        return [], iter(())
    header_line, header = first
    names = [name or f"Unnamed: {i}" for i, name in enumerate(header)]
    duplicate = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if duplicate is not None:
        raise DataError(
            f"{setting}: {file}:{header_line}: the header names column {duplicate!r} twice. Rename one of them."
        )

    def rows() -> Iterator[tuple[int, list[str]]]:
        for line, fields in records:
            if len(fields) != len(names):
                values = f"{len(fields)} value" + ("s" if len(fields) != 1 else "")
                raise DataError(
                    f"{setting}: {file}:{line}: {values}, but the header ({file}:{header_line}) names {len(names)} "
                    f"columns ({', '.join(names)}). Fix that line; put values that hold commas in double quotes."
                )
            yield line, fields

    return names, rows()


def json_rows(file: Path, setting: str) -> Iterator[tuple[str, Any]]:
    """('file:line', row) for each row of a JSON Lines file (or 'file: element i' of a JSON array),
    with the types the file gives them."""
    try:
        with file.open(encoding="utf-8") as fh:
            head = fh.read(1024).lstrip()
        if head.startswith("["):  # a JSON array, not JSON Lines
            try:
                rows = json.loads(file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise DataError(f"{setting}: {file}:{exc.lineno}: invalid JSON ({exc.msg}).") from None
            for i, row in enumerate(rows):
                if not isinstance(row, dict):
                    raise DataError(f"{setting}: {file}: element {i} of the array is not an object.")
                yield f"{file}: element {i}", row
            return
        with file.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"{setting}: {file}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno}). "
                        "Each line must hold one JSON object."
                    ) from None
                if not isinstance(row, dict):
                    raise DataError(
                        f"{setting}: {file}:{lineno}: expected a JSON object per line, found {type(row).__name__}."
                    )
                yield f"{file}:{lineno}", row
    except UnicodeDecodeError as exc:
        raise not_utf8(file, setting, exc) from None
