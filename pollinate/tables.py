"""Read a user's table (CSV, JSON, JSONL, saved dataset) and its labels, naming every bad cell.

People bring data as they have it: string labels (``World``, ``positive``), integer
labels, a Hugging Face ``ClassLabel`` column, a JSONL file with one broken line. A
problem must be one line that names the file, the 1-based line (or row) and the
column, never a traceback from deep inside a library. Labels that are names become a
``ClassLabel`` column whose names (sorted, or the run's own list) travel with the data,
so the label map built from the training file is the one every client and the
exported adapter use.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import ClassLabel, Dataset, Value, load_from_disk

from pollinate.config import ConfigError

_INTEGER = re.compile(r"\s*[+-]?\d+\s*")


class DataError(ConfigError):
    """A data file cannot be used as it is; the message names file, line or row, and column."""


def read_rows(path: str) -> tuple[Dataset, str]:
    """The table at ``path`` and the word for its positions (``line`` in files, ``row`` otherwise)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file not found: {path}")
    if p.is_dir():
        try:
            table = load_from_disk(str(p))
        except (FileNotFoundError, ValueError) as err:
            raise DataError(f"{path}: not a dataset saved with save_to_disk ({err})") from err
        if not isinstance(table, Dataset):
            raise DataError(f"{path}: expected one split, found splits {list(table)}")
        return table, "row"
    if p.suffix == ".csv":
        return Dataset.from_list(_csv_rows(p)), "line"
    if p.suffix in (".jsonl", ".json"):
        return Dataset.from_list(_json_rows(p)), "line"
    raise DataError(f"data file {path}: expected .csv, .jsonl, .json or a saved dataset directory")


def _csv_rows(path: Path) -> list[dict[str, Any]]:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header:
            raise DataError(f"{path}: empty file, expected a header line")
        rows = []
        for record in reader:
            if not record:
                continue
            if len(record) != len(header):
                raise DataError(f"{path}: line {reader.line_num}: {len(record)} fields, "
                                f"the header has {len(header)} ({', '.join(header)})")
            rows.append({"__line__": reader.line_num, **dict(zip(header, record, strict=True))})
    if not rows:
        raise DataError(f"{path}: no rows after the header")
    return rows


def _json_rows(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):  # a JSON array of objects (Alpaca's files)
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from err
        numbered = [(i + 1, item) for i, item in enumerate(items)]
        where = "item"
    else:
        numbered = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {number}: not valid JSON ({err.msg} at column "
                                f"{err.colno})") from err
        where = "line"
    rows = []
    for number, item in numbered:
        if not isinstance(item, dict):
            raise DataError(f"{path}: {where} {number}: expected a JSON object, got {type(item).__name__}")
        rows.append({"__line__": number, **item})
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def positions(table: Dataset) -> list[int]:
    """1-based line (or row) number of every row, for messages."""
    if "__line__" in table.column_names:
        return list(table["__line__"])
    return list(range(1, len(table) + 1))


def check_columns(table: Dataset, path: str, wanted: Sequence[str]) -> None:
    missing = [c for c in wanted if c not in table.column_names]
    if missing:
        have = [c for c in table.column_names if c != "__line__"]
        raise DataError(f"{path}: missing column {missing[0]!r} (has {', '.join(have)}); "
                        "name yours with --set text-column=... / label-column=...")


def check_text(table: Dataset, path: str, column: str, where: str) -> None:
    """Every value of a text column is a string (JSON ``null`` or a number is a mistake)."""
    for number, value in zip(positions(table), table[column], strict=True):
        if not isinstance(value, str):
            raise DataError(f"{path}: {where} {number}, column {column!r}: expected text, got {value!r}")


def label_ids(table: Dataset, path: str, column: str, where: str,
              names: Sequence[str] | None = None) -> Dataset:
    """``table`` with ``column`` as integer ids: integers kept, names mapped through ``names``.

    Without ``names``, names are this table's sorted distinct labels. A ``ClassLabel``
    column keeps its own names (or is mapped onto ``names`` by name). A label column
    that is mostly integers with an odd value, an empty label, or a name missing from
    ``names`` is a :class:`DataError` naming the line.
    """
    feature = table.features[column]
    if isinstance(feature, ClassLabel):
        if names is None or list(names) == list(feature.names):
            return table
        values: list[Any] = [feature.int2str(i) for i in table[column]]
    else:
        values = list(table[column])
    numbers = positions(table)
    for number, value in zip(numbers, values, strict=True):
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DataError(f"{path}: {where} {number}, column {column!r}: empty label")
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise DataError(f"{path}: {where} {number}, column {column!r}: label {value!r} is "
                            "neither an integer nor a name")
    integer = [isinstance(v, int) or bool(_INTEGER.fullmatch(v)) for v in values]
    if names is None and sum(integer) * 2 > len(values):  # integer labels, maybe with odd ones
        for number, value, ok in zip(numbers, values, integer, strict=True):
            if not ok:
                raise DataError(f"{path}: {where} {number}, column {column!r}: label {value!r} is not "
                                "an integer like the other labels")
        ids = [int(v) for v in values]
        bad = next(((n, i) for n, i in zip(numbers, ids, strict=True) if i < 0), None)
        if bad:
            raise DataError(f"{path}: {where} {bad[0]}, column {column!r}: label {bad[1]} is negative")
        return _with_column(table, column, ids, Value("int64"))
    text = [str(v).strip() for v in values]
    names = list(names) if names is not None else sorted(set(text))
    index = {name: i for i, name in enumerate(names)}
    for number, value in zip(numbers, text, strict=True):
        if value not in index:
            shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
            raise DataError(f"{path}: {where} {number}, column {column!r}: label {value!r} is not one "
                            f"of the run's labels ({shown})")
    return _with_column(table, column, [index[v] for v in text], ClassLabel(names=names))


def _with_column(table: Dataset, column: str, values: list[int], feature: Any) -> Dataset:
    return table.remove_columns(column).add_column(column, values, feature=feature)


def label_names(table: Dataset) -> tuple[str, ...]:
    """The names of a ``ClassLabel`` label column, or ``()`` for integer labels."""
    feature = table.features.get("label")
    return tuple(feature.names) if isinstance(feature, ClassLabel) else ()
