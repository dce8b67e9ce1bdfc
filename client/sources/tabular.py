"""Loading real tabular files (CSV, JSON Lines) into arrays, with errors people can act on.

Real exports are messy: byte-order marks, semicolons from spreadsheet locales, CRLF line
ends, quoted fields, stray blank lines, "NA" cells. We accept the harmless quirks and
reject the dangerous ones (missing values, non-numbers, ragged rows) with a ``DataError``
that points at ``file:line`` and the column or key, because a silently imputed or shifted
column is far harder to find later than a loud failure now.

Parsing walks the file row by row (it happens once, at load time), collecting raw cells;
the numeric arrays are then built and validated in one vectorised pass.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .base import DataError

Format = Literal["auto", "csv", "jsonl"]

MISSING = frozenset({"", "na", "n/a", "nan", "null", "none", "?"})
_DELIMITERS = (",", ";", "\t", "|")
_CSV_SUFFIXES = frozenset({".csv", ".tsv", ".tab", ".psv", ".txt"})
_JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson", ".json"})
_INT_RE = re.compile(r"[+-]?\d+")
_SNIFF_CHARS = 1 << 16
_SNIFF_RECORDS = 20


@dataclass
class Table:
    """A loaded table: features, encoded labels and (optionally) the time column.

    ``y[i]`` indexes ``classes``; ``time`` is float64 (numbers as given, ISO-8601 date-times
    as seconds since the Unix epoch, naive ones taken as UTC) and rows are sorted by it."""

    x: np.ndarray
    y: np.ndarray
    classes: list[str]
    features: list[str]
    time: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class _Raw:
    """Cells as read from the file, before any numeric conversion."""

    lines: np.ndarray  # line number of each row, for error messages
    labels: list[str]
    cells: list[list[str]] | list[list[float]]
    times: list[str] | None
    features: list[str]
    what: str  # "column" (CSV) or "key" (JSONL)


def load_table(
    path: str | Path,
    *,
    label: str,
    features: Sequence[str] | None = None,
    time: str | None = None,
    fmt: Format = "auto",
    classes: Sequence[str] | None = None,
) -> Table:
    """Read a CSV or JSONL file into a ``Table`` (see the module docstring for the rules).

    ``features=None`` takes every column (key) except ``label`` and ``time``. ``classes``
    fixes the label vocabulary and its order (an unseen label is then an error); otherwise it
    is the sorted set of labels found (numerically when they are all integers)."""
    _check_arguments(label, features, time, fmt)
    name = str(path)
    text = _read_text(Path(path), name)
    if _detect_format(Path(path), text, fmt) == "csv":
        raw = _read_csv(text, name, label, features, time)
    else:
        raw = _read_jsonl(text, name, label, features, time)
    return _build(raw, name, label, time, classes)


# ---------------------------------------------------------------------------- arguments / io


def _check_arguments(
    label: str, features: Sequence[str] | None, time: str | None, fmt: str
) -> None:
    if fmt not in ("auto", "csv", "jsonl"):
        raise ValueError(f"fmt must be 'auto', 'csv' or 'jsonl', got {fmt!r}")
    if time is not None and time == label:
        raise ValueError(f"time and label must be different columns, both are {label!r}")
    if features is None:
        return
    if isinstance(features, str):
        raise ValueError("features must be a sequence of column names, not a single string")
    if not features:
        raise ValueError("features must name at least one column (or be None for all)")
    if len(set(features)) != len(features):
        raise ValueError(f"features contains duplicates: {list(features)}")
    for role, col in (("label", label), ("time", time)):
        if col is not None and col in features:
            raise ValueError(f"{role} column {col!r} must not also be listed in features")


def _read_text(path: Path, name: str) -> str:
    """Decode as UTF-8 (a BOM is dropped); a bad byte is reported with its line."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{name}: cannot read file: {exc.strerror or exc}") from exc
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise DataError(f"{name}: not a valid gzip file: {exc}") from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{name}:{line}: not valid UTF-8 (byte {exc.start}): {exc.reason}") from exc


def _detect_format(path: Path, text: str, fmt: Format) -> Literal["csv", "jsonl"]:
    """Explicit ``fmt`` wins, then the file extension (ignoring ``.gz``), then the content."""
    if fmt != "auto":
        return fmt
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    suffix = suffixes[-1] if suffixes else ""
    if suffix in _CSV_SUFFIXES:
        return "csv"
    if suffix in _JSONL_SUFFIXES:
        return "jsonl"
    return "jsonl" if text.lstrip().startswith("{") else "csv"


def _column_error(name: str, line: int, role: str, col: str, available: Sequence[str]) -> DataError:
    shown = ", ".join(repr(c) for c in available)
    return DataError(f"{name}:{line}: {role} column {col!r} not found; available: {shown}")


# ---------------------------------------------------------------------------------- csv


def _is_blank(record: list[str]) -> bool:
    return len(record) <= 1 and not "".join(record).strip()


def _sniff_delimiter(text: str) -> str:
    """Pick the delimiter that splits the header into the most fields while splitting the
    next records into the same number; ties go to the more common delimiter."""
    sample = text[:_SNIFF_CHARS]
    if len(text) > _SNIFF_CHARS and "\n" in sample:
        sample = sample[: sample.rindex("\n") + 1]  # drop the partial last line
    best, best_score = ",", (False, False, 0)
    for delim in _DELIMITERS:
        reader = csv.reader(io.StringIO(sample, newline=""), delimiter=delim, skipinitialspace=True)
        try:
            widths = [len(r) for r in islice((r for r in reader if not _is_blank(r)), _SNIFF_RECORDS)]
        except csv.Error:
            continue
        if not widths:
            continue
        score = (all(w == widths[0] for w in widths), widths[0] > 1, widths[0])
        if score > best_score:
            best, best_score = delim, score
    return best


def _csv_records(text: str, name: str, delimiter: str):  # noqa: ANN202 - generator
    """Yield (first line number, stripped fields) of each non-blank record."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, skipinitialspace=True)
    previous = 0
    try:
        for record in reader:
            start, previous = previous + 1, reader.line_num
            if not _is_blank(record):
                yield start, [field.strip() for field in record]
    except csv.Error as exc:
        raise DataError(f"{name}:{reader.line_num}: malformed CSV: {exc}") from exc


def _csv_header(
    header: list[str], line: int, name: str, label: str, features: Sequence[str] | None,
    time: str | None,
) -> tuple[list[str], list[int]]:
    """Resolve the selected columns to (feature names, [label, time?, *feature] positions)."""
    seen: set[str] = set()
    for col in header:
        if col in seen and col:
            raise DataError(f"{name}:{line}: duplicate column name {col!r} in header")
        seen.add(col)
    position = {col: i for i, col in enumerate(header)}
    wanted = [("label", label)] + ([("time", time)] if time is not None else [])
    if features is None:
        features = [c for c in header if c not in (label, time)]
        if "" in features:
            raise DataError(
                f"{name}:{line}: column {header.index('') + 1} has no name; "
                "pass features=[...] to choose columns explicitly"
            )
        if not features:
            raise DataError(f"{name}:{line}: no feature columns besides {label!r}")
    wanted += [("feature", f) for f in features]
    for role, col in wanted:
        if col not in position:
            raise _column_error(name, line, role, col, header)
    return list(features), [position[col] for _, col in wanted]


def _read_csv(
    text: str, name: str, label: str, features: Sequence[str] | None, time: str | None
) -> _Raw:
    records = _csv_records(text, name, _sniff_delimiter(text))
    first = next(records, None)
    if first is None:
        raise DataError(f"{name}: empty file, expected a header row")
    header_line, header = first
    names, positions = _csv_header(header, header_line, name, label, features, time)
    n_fields = len(header)
    lines: list[int] = []
    rows: list[list[str]] = []
    for line, fields in records:
        if len(fields) != n_fields:
            raise DataError(
                f"{name}:{line}: expected {n_fields} fields as in the header, found {len(fields)}"
            )
        lines.append(line)
        rows.append([fields[i] for i in positions])
    if not rows:
        raise DataError(f"{name}:{header_line}: header only, no data rows")
    offset = 2 if time is not None else 1
    return _Raw(
        lines=np.asarray(lines, dtype=np.int64),
        labels=[row[0] for row in rows],
        cells=[row[offset:] for row in rows],
        times=[row[1] for row in rows] if time is not None else None,
        features=names,
        what="column",
    )


# -------------------------------------------------------------------------------- jsonl


def _json_object(raw: str, line: int, name: str) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DataError(f"{name}:{line}: invalid JSON: {exc.msg} (at character {exc.colno})") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{name}:{line}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _json_number(value: Any, name: str, line: int, key: str) -> float:
    """A JSON value that must be a number: bool and numeric strings are rejected."""
    where = f"{name}:{line}: key {key!r}"
    if value is None:
        raise DataError(f"{where}: missing value (null); values are not imputed")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(f"{where}: {value!r} is not a number")
    try:
        number = float(value)
    except OverflowError as exc:
        raise DataError(f"{where}: {value!r} is too large") from exc
    if math.isnan(number):
        raise DataError(f"{where}: missing value (NaN); values are not imputed")
    return number


def _json_text(value: Any, name: str, line: int, key: str) -> str:
    """Labels and times travel as text, so CSV and JSONL share their handling."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        return value.strip()
    if value is None:
        return ""  # reported as a missing value by the shared checks
    raise DataError(f"{name}:{line}: key {key!r}: {value!r} is not a valid value")


def _read_jsonl(
    text: str, name: str, label: str, features: Sequence[str] | None, time: str | None
) -> _Raw:
    lines: list[int] = []
    labels: list[str] = []
    cells: list[list[float]] = []
    times: list[str] = []
    names: list[str] | None = list(features) if features is not None else None
    exact: set[str] | None = None  # with features=None every record must have these keys
    for line, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        obj = _json_object(raw, line, name)
        if names is None:
            names = [k for k in obj if k not in (label, time)]
            exact = set(obj)
            if not names:
                raise DataError(f"{name}:{line}: no feature keys besides {label!r}")
        required = [label] + ([time] if time is not None else []) + names
        for key in required:
            if key not in obj:
                shown = ", ".join(repr(k) for k in obj)
                raise DataError(f"{name}:{line}: missing key {key!r}; available: {shown}")
        if exact is not None and len(obj) != len(exact):
            extra = next(k for k in obj if k not in exact)
            raise DataError(f"{name}:{line}: unexpected key {extra!r} (not in the first record)")
        lines.append(line)
        labels.append(_json_text(obj[label], name, line, label))
        cells.append([_json_number(obj[k], name, line, k) for k in names])
        if time is not None:
            times.append(_time_text(obj[time], name, line, time))
    if names is None:
        raise DataError(f"{name}: no records (the file is empty or blank)")
    return _Raw(
        lines=np.asarray(lines, dtype=np.int64),
        labels=labels,
        cells=cells,
        times=times if time is not None else None,
        features=names,
        what="key",
    )


def _time_text(value: Any, name: str, line: int, key: str) -> str:
    if isinstance(value, bool):
        raise DataError(f"{name}:{line}: key {key!r}: {value!r} is not a number")
    return _json_text(value, name, line, key)


# ------------------------------------------------------------------------- shared building


def _build(raw: _Raw, name: str, label: str, time: str | None, classes: Sequence[str] | None) -> Table:
    x = _features(raw, name)
    y, class_names = _encode_labels(raw, name, label, classes)
    stamps = None
    if time is not None and raw.times is not None:
        stamps = _parse_times(raw.times, raw.lines, name, f"{raw.what} {time!r}")
        order = np.argsort(stamps, kind="stable")
        x, y, stamps = x[order], y[order], stamps[order]
    return Table(x=x, y=y, classes=class_names, features=raw.features, time=stamps)


def _features(raw: _Raw, name: str) -> np.ndarray:
    """Convert all feature cells at once; on failure, find the first bad cell to report."""
    n, d = len(raw.cells), len(raw.features)
    if raw.what == "key":
        values = np.asarray(raw.cells, dtype=np.float64).reshape(n, d)
    else:
        cells = np.asarray(raw.cells, dtype=np.str_).reshape(n, d)
        _reject_missing(cells, raw, name)
        values = _cells_to_float(cells, raw, name)
    x = values.astype(np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        shown = raw.cells[i][j]
        raise DataError(
            f"{name}:{raw.lines[i]}: {raw.what} {raw.features[j]!r}: "
            f"{shown!r} is not a finite float32 number"
        )
    return x


def _reject_missing(cells: np.ndarray, raw: _Raw, name: str) -> None:
    missing = np.isin(np.char.lower(cells), list(MISSING))
    if missing.any():
        i, j = np.argwhere(missing)[0]
        raise DataError(
            f"{name}:{raw.lines[i]}: {raw.what} {raw.features[j]!r}: "
            f"missing value {str(cells[i, j])!r}; values are not imputed"
        )


def _cells_to_float(cells: np.ndarray, raw: _Raw, name: str) -> np.ndarray:
    try:
        return cells.astype(np.float64)
    except ValueError:
        pass
    for i in range(cells.shape[0]):  # error path only: locate the culprit
        for j in range(cells.shape[1]):
            try:
                cells[i, j : j + 1].astype(np.float64)
            except ValueError:
                raise DataError(
                    f"{name}:{raw.lines[i]}: {raw.what} {raw.features[j]!r}: "
                    f"{str(cells[i, j])!r} is not a number"
                ) from None
    raise AssertionError("unreachable: conversion failed but every cell converts")


def _canonical_label(text: str) -> str:
    """Integers are compared by value, so '007' and '7' are one class."""
    return str(int(text)) if _INT_RE.fullmatch(text) else text


def _sort_classes(found: list[str]) -> list[str]:
    if all(_INT_RE.fullmatch(c) for c in found):
        return sorted(found, key=int)
    try:
        return sorted(found, key=float)
    except ValueError:
        return sorted(found)


def _encode_labels(
    raw: _Raw, name: str, label: str, classes: Sequence[str] | None
) -> tuple[np.ndarray, list[str]]:
    given = None if classes is None else [str(c) for c in classes]
    canon = np.asarray([_canonical_label(s) for s in raw.labels], dtype=np.str_)
    allowed = set() if given is None else {_canonical_label(c) for c in given}
    missing = np.isin(np.char.lower(canon), list(MISSING - allowed))
    if missing.any():
        i = int(np.argmax(missing))
        raise DataError(
            f"{name}:{raw.lines[i]}: {raw.what} {label!r}: missing label {raw.labels[i]!r}"
        )
    found, inverse = np.unique(canon, return_inverse=True)
    if given is None:
        names = _sort_classes([str(c) for c in found])
        lookup = {c: i for i, c in enumerate(names)}
    else:
        keys = [_canonical_label(c) for c in given]
        if len(set(keys)) != len(keys):
            raise ValueError(f"classes contains duplicates: {given}")
        names, lookup = given, {c: i for i, c in enumerate(keys)}
        for k, value in enumerate(found.tolist()):
            if value not in lookup:
                i = int(np.argmax(inverse == k))
                raise DataError(
                    f"{name}:{raw.lines[i]}: {raw.what} {label!r}: unknown label "
                    f"{raw.labels[i]!r}; expected one of {given}"
                )
    remap = np.asarray([lookup[c] for c in found.tolist()], dtype=np.int64)
    return remap[inverse.reshape(-1)], names


def _iso_seconds(text: str) -> float:
    stamp = datetime.fromisoformat(text)
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=timezone.utc)
    return stamp.timestamp()


def _parse_times(values: list[str], lines: np.ndarray, name: str, where: str) -> np.ndarray:
    """Numbers if the first value is one, else ISO-8601 date-times; never a mix."""
    for i, value in enumerate(values):
        if value.lower() in MISSING:
            raise DataError(f"{name}:{lines[i]}: {where}: missing time {value!r}")
    try:
        float(values[0])
    except ValueError:
        parse, kind = _iso_seconds, "an ISO-8601 date-time"
    else:
        parse, kind = float, "a number"
    stamps = np.empty(len(values), dtype=np.float64)
    for i, value in enumerate(values):
        try:
            stamps[i] = parse(value)
        except ValueError:
            raise DataError(f"{name}:{lines[i]}: {where}: {value!r} is not {kind}") from None
    if not np.all(np.isfinite(stamps)):
        i = int(np.argmax(~np.isfinite(stamps)))
        raise DataError(f"{name}:{lines[i]}: {where}: {values[i]!r} is not a finite time")
    return stamps
