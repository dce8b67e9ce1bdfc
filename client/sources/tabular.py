"""Loading real tabular files (CSV, JSON Lines) into arrays, with errors people can act on.

Real exports are messy: byte-order marks, semicolons and decimal commas from spreadsheet
locales, CRLF line ends, quoted fields, stray blank lines, "NA" cells. We accept the
harmless quirks and reject the dangerous ones (missing values, non-numbers, ragged rows)
with a ``DataError`` that points at ``file:line`` and the column or key, because a
silently imputed or shifted column is far harder to find later than a loud failure now.

A file without quotes (most machine-written ones) is read by numpy's C parser, after one
vectorised check of its rows' widths. Anything that parser cannot take, and any file with
a quote, goes to the careful reader, which walks the rows in Python, converts feature
cells in vectorised blocks as they come (so a big file is never held as millions of
Python strings at once), and names the first problem. Both give the same table.
"""

from __future__ import annotations

import contextlib
import csv
import decimal
import difflib
import gzip
import io
import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import chain, compress, islice
from operator import methodcaller
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from .base import DataError

Format = Literal["auto", "csv", "jsonl"]
_T = TypeVar("_T")

MISSING = frozenset({"", "na", "n/a", "nan", "null", "none", "?"})
_DELIMITERS = (",", ";", "\t", "|")
_CSV_SUFFIXES = frozenset({".csv", ".tsv", ".tab", ".psv", ".txt"})
_JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson", ".json"})
_INT_RE = re.compile(r"[+-]?\d+")
_WHOLE_RE = re.compile(r"([+-]?\d+)\.0*")  # "1.0", "2.": an integer written as a float
_EXP_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]\d{1,2}")  # "1.0e+00" (savetxt); not "1E3"
_SEP_RE = re.compile(r"sep=(.)")  # Excel's first line naming the delimiter
_THOUSANDS = {
    ",": re.compile(r"[+-]?\d{1,3}(\.\d{3})+(,\d*)?"),  # 1.234,5 in a ';' file
    ".": re.compile(r"[+-]?\d{1,3}(,\d{3})+(\.\d*)?"),  # 1,234.5 elsewhere
}
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_F32_MAX = float(np.finfo(np.float32).max)
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
    # The `group` column's value of each row, as an index into `group_names` (sorted as
    # classes are): which device, site or user a row came from.
    groups: np.ndarray | None = None
    group_names: list[str] | None = None

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class Columns:
    """Which columns (JSONL: keys) a load takes: the label, the features (None: all the
    others but ``exclude``), the optional time column and the optional group column (whose
    text values say which device, site or user a row came from)."""

    label: str
    features: Sequence[str] | None = None
    time: str | None = None
    exclude: tuple[str, ...] = ()
    group: str | None = None

    @property
    def roles(self) -> list[tuple[str, str]]:
        """The text columns a row has besides its features, in the order rows carry them."""
        return [("label", self.label)] + [
            (role, col) for role, col in (("time", self.time), ("group", self.group)) if col
        ]


@dataclass
class _Raw:
    """Cells as read from the file, before any numeric conversion."""

    lines: np.ndarray  # line number of each row, for error messages
    labels: list[str]
    x: np.ndarray | None  # float32 features, or None when a cell was bad:
    x_error: _RowError | None  # the first bad cell
    times: list[str] | None
    features: list[str]
    what: str  # "column" (CSV) or "key" (JSONL)
    groups: list[str] | None = None
    problems: list[_RowError] = field(default_factory=list)  # rows refused whole (JSONL)


def load_table(
    path: str | Path,
    *,
    label: str,
    features: Sequence[str] | None = None,
    time: str | None = None,
    fmt: Format = "auto",
    classes: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    group: str | None = None,
) -> Table:
    """Read a CSV or JSONL file into a ``Table`` (see the module docstring for the rules).

    ``features=None`` takes every column (key) except ``label``, ``time`` and those in
    ``exclude`` (each of which must exist: a misspelt one would leave its column in). ``classes``
    fixes the label vocabulary and its order (an unseen label is then an error); otherwise it
    is the sorted set of labels found (numerically when they are all integers). ``group``
    names a text column kept as ``Table.groups`` (not a feature), e.g. a site or device id."""
    _check_arguments(label, features, time, fmt, group)
    if exclude and features is not None:
        raise ValueError("exclude leaves columns out of all the others: pass it without features")
    name = str(path)
    text = _read_text(Path(path), name)
    cols = Columns(label, features, time, tuple(exclude), group)
    read = _read_csv if detect_format(path, text, fmt) == "csv" else _read_jsonl
    raw = read(text, name, cols)
    return _build(raw, name, cols, classes)


# ---------------------------------------------------------------------------- arguments / io


def _check_arguments(
    label: str, features: Sequence[str] | None, time: str | None, fmt: str,
    group: str | None = None,
) -> None:
    if fmt not in ("auto", "csv", "jsonl"):
        raise ValueError(f"fmt must be 'auto', 'csv' or 'jsonl', got {fmt!r}")
    if time is not None and time == label:
        raise ValueError(f"time and label must be different columns, both are {label!r}")
    if group is not None and group in (label, time):
        raise ValueError(f"the group column {group!r} is also the label or time column")
    if group is not None and features is not None and group in features:
        raise ValueError(f"the group column {group!r} must not also be listed in features")
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


GZIP_MAGIC = b"\x1f\x8b"
BOM = "\ufeff"  # the byte-order mark, as text


def _read_text(path: Path, name: str) -> str:
    """Decode as UTF-8 (a BOM is dropped), or as UTF-16 with a BOM (Excel's "Unicode
    text"); a bad byte is reported with its line and what the file probably is."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{name}: cannot read file: {exc.strerror or exc}") from exc
    if data[:2] == GZIP_MAGIC or path.suffix.lower() == ".gz":  # by content: any name
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise DataError(f"{name}: not a valid gzip file: {exc}") from exc
    encoding = text_encoding(data[:4])
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - data.rfind(b"\n", 0, exc.start)  # 1-based, in bytes
        raise DataError(
            f"{name}:{line}: not valid {encoding.removesuffix('-sig').upper()} "
            f"(byte 0x{data[exc.start]:02x} at byte {column} of the line): {exc.reason}; "
            f"{encoding_hint(data[:_SNIFF_CHARS])}"
        ) from exc
    # A second BOM (a file that went through two tools that each added one) would be
    # part of the first column's name, quotes and all.
    text = text.lstrip(BOM)
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise DataError(f"{name}:{line}: {encoding_hint(data[:_SNIFF_CHARS])}")
    return text


def text_encoding(head: bytes) -> str:
    """The codec for a file starting with `head`: UTF-16 if it has that BOM, else UTF-8."""
    return "utf-16" if head.startswith(_UTF16_BOMS) else "utf-8-sig"


def encoding_hint(sample: bytes) -> str:
    """What to tell someone whose file is not UTF-8: the likely encoding and the fix."""
    if sample.startswith(b"PK\x03\x04"):  # a zip: .xlsx, .ods and .numbers are zips
        return ("the file is a zip archive, probably a spreadsheet workbook (.xlsx, .ods): "
                "export the sheet as CSV (in Excel: 'CSV UTF-8'), or unzip the archive")
    if sample.startswith(b"\xd0\xcf\x11\xe0"):  # an OLE2 compound file: Excel 97-2003
        return "the file is an Excel 97-2003 workbook (.xls): export the sheet as 'CSV UTF-8'"
    if sample.count(b"\x00") > len(sample) // 4:  # every other byte, in Latin text
        return (
            "the file has NUL bytes, so it is probably UTF-16 without a byte-order mark: "
            "save it as UTF-8 (in Excel: 'CSV UTF-8')"
        )
    if b"\x00" in sample:
        return "the file has stray NUL bytes: it is damaged, or not a text file"
    return (
        "it is probably Windows-1252 / Latin-1 (Excel's plain 'CSV' on Windows): save it as "
        "UTF-8 (in Excel: 'CSV UTF-8'), or convert it: iconv -f cp1252 -t utf-8"
    )


def detect_format(path: str | Path, text: str, fmt: Format) -> Literal["csv", "jsonl"]:
    """Explicit ``fmt`` wins, then the file extension (ignoring ``.gz``), then the content
    (``text``: the start of the file; ``-`` is stdin, which has no extension)."""
    if fmt != "auto":
        return fmt
    suffixes = [s.lower() for s in Path(path).suffixes] if str(path) != "-" else []
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    suffix = suffixes[-1] if suffixes else ""
    if suffix in _CSV_SUFFIXES:
        return "csv"
    if suffix in _JSONL_SUFFIXES:
        return "jsonl"
    return "jsonl" if text.lstrip().startswith("{") else "csv"


def _did_you_mean(wanted: str, available: Sequence[str]) -> str:
    """'; did you mean 'site'?' for a name that is off by case, spaces or a typo."""
    folded = {a.strip().casefold(): a for a in available}
    close = folded.get(wanted.strip().casefold()) or next(
        iter(difflib.get_close_matches(wanted, list(available), n=1, cutoff=0.75)), None
    )
    return f"; did you mean {close!r}?" if close else ""


def _column_error(name: str, line: int, role: str, col: str, available: Sequence[str]) -> DataError:
    shown = ", ".join(repr(c) for c in available) + _did_you_mean(col, available)
    json_like = bool(available) and available[0].lstrip().startswith("{")
    hint = (
        '; the file looks like JSON Lines: read it as jsonl (stream.source = "jsonl", or '
        "feed --format jsonl)" if json_like else ""
    )
    if role == "label" and not _did_you_mean(col, available):
        hint += "; name the column of classes: stream.label (fedstream feed: --label)"
    if sum(_a_number(c) for c in available) > len(available) // 2:
        hint += "; the first row looks like data, not a header: add a row naming the columns"
    role = {"group": "group (partition.column)"}.get(role, role)
    return DataError(f"{name}:{line}: {role} column {col!r} not found; available: {shown}{hint}")


# ---------------------------------------------------------------------------------- csv


def _is_blank(record: list[str]) -> bool:
    """An empty line, or a row of empty cells (`,,,`: how spreadsheets export the blank
    rows under a table): nothing in it to learn, or to lose."""
    return not "".join(record).strip()


def _sniff_delimiter(text: str) -> str:
    """Pick the delimiter that splits the header at all, then the one whose next records
    most often have the header's width, then the widest; ties go to the commoner one.

    Agreement is a fraction, not all-or-nothing, so one ragged row near the top still gets
    reported as ragged instead of silently switching to a delimiter that never occurs."""
    sample = text[:_SNIFF_CHARS]
    if len(text) > _SNIFF_CHARS and "\n" in sample:
        sample = sample[: sample.rindex("\n") + 1]  # drop the partial last line
    best, best_score = ",", (False, 0.0, 0)
    for delim in _DELIMITERS:
        reader = csv.reader(io.StringIO(sample, newline=""), delimiter=delim, skipinitialspace=True)
        try:
            records = (r for r in reader if not _is_blank(r))
            widths = [len(r) for r in islice(records, _SNIFF_RECORDS)]
        except csv.Error:
            continue
        if not widths:
            continue
        agree = sum(w == widths[0] for w in widths) / len(widths)
        score = (widths[0] > 1, agree, widths[0])
        if score > best_score:
            best, best_score = delim, score
    return best


def excel_delimiter(line: str) -> str | None:
    """The delimiter a `sep=;` first line names (Excel writes and reads it), or None."""
    match = _SEP_RE.fullmatch(line.strip().strip('"'))
    return match.group(1) if match else None


UNTERMINATED = (
    "unterminated quoted field: a '\"' opened on this line is not closed before the line "
    "ends, so the lines after it would be read into one value"
)


def decimal_mark(delimiter: str) -> str:
    """',' in a semicolon-separated file, else '.'.

    Spreadsheets write ';' between fields exactly in the locales whose decimal mark is a
    comma ("19,87"), since a comma there is part of a number. A point stays a decimal
    point in such a file too (programs write ';' files with points); a number with
    thousands separators ("1.234,5") is refused, as everywhere.
    """
    return "," if delimiter == ";" else "."


_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$")


def _split_lines(text: str) -> Iterator[str]:
    """The lines of `text` with their ends (\\n, \\r\\n or a lone \\r), one at a time: an
    io.StringIO would hold a second, four-bytes-a-character copy of the whole file."""
    return (match.group() for match in _LINE.finditer(text))


def _csv_records(text: str, name: str, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """Yield (first line number, fields) of each non-blank record. Fields are not stripped
    here: numpy's number parser ignores surrounding blanks, so only the few text cells
    (header, labels, times) pay for stripping."""
    reader = csv.reader(_split_lines(text), delimiter=delimiter, skipinitialspace=True)
    previous = 0
    last: tuple[int, list[str]] | None = None
    try:
        for record in reader:
            start, previous = previous + 1, reader.line_num
            if not _is_blank(record):
                last = (start, record)
                yield start, record
    except csv.Error as exc:
        raise DataError(f"{name}:{reader.line_num}: malformed CSV: {exc}") from exc
    if last is not None and _unterminated(text, last[0], last[1], delimiter):
        raise DataError(f"{name}:{last[0]}: {UNTERMINATED}")


def _no_line_breaks(
    fields: list[str], positions: list[int], header: list[str], name: str, line: int
) -> None:
    """Refuse a used value that spans lines: a quote left open on one line and closed on a
    later one reads the rows between into one value (a new class, or a number that is
    not), with as many fields as a row. A text column that is not read may hold them."""
    for i in positions:
        if "\n" in fields[i] or "\r" in fields[i]:
            raise DataError(
                f"{name}:{line}: column '{header[i]}': {UNTERMINATED} (close the quote on "
                "its line, or take the line break out of the value)"
            )


def _unterminated(text: str, start: int, record: list[str], delimiter: str) -> bool:
    """Did the final record swallow the end of the file through an unclosed quote?

    The lenient reader (needed for quirks like ``"a" ,``) silently reads to the end of the
    file in that case; only a record holding a line break can be affected, and re-reading
    just that record strictly tells the two apart."""
    if not any("\n" in field or "\r" in field for field in record):
        return False
    tail = "\n".join(text.split("\n")[start - 1 :])
    strict = csv.reader(
        io.StringIO(tail, newline=""), delimiter=delimiter, skipinitialspace=True, strict=True
    )
    try:
        for _ in strict:
            pass
    except csv.Error as exc:
        return "unexpected end of data" in str(exc)
    return False


def _csv_header(
    header: list[str], line: int, name: str, cols: Columns
) -> tuple[list[str], list[int]]:
    """Resolve the selected columns to (feature names, [label, time?, *feature] positions)."""
    features, exclude = cols.features, cols.exclude
    seen: set[str] = set()
    for col in header:
        if col in seen and col:
            raise DataError(f"{name}:{line}: duplicate column name {col!r} in header")
        seen.add(col)
    position = {col: i for i, col in enumerate(header)}
    wanted = cols.roles
    if features is None:
        for col in exclude:
            if col not in position:
                raise _column_error(name, line, "excluded", col, header)
        features = [c for c in header if c not in ({c for _, c in wanted} | set(exclude))]
        if "" in features:
            raise DataError(
                f"{name}:{line}: column {header.index('') + 1} has no name; "
                "choose the columns with stream.features (fedstream feed: --features)"
            )
        if not features:
            raise DataError(f"{name}:{line}: no feature columns besides {cols.label!r}")
    wanted += [("feature", f) for f in features]
    for role, col in wanted:
        if col not in position:
            raise _column_error(name, line, role, col, header)
    return list(features), [position[col] for _, col in wanted]


def _read_csv(text: str, name: str, cols: Columns) -> _Raw:
    end = text.find("\n")
    delimiter = excel_delimiter(text[: end if end >= 0 else len(text)])
    if delimiter is not None:  # keep the line break, so line numbers stay the file's
        text = text[end:] if end >= 0 else ""
    else:
        delimiter = _sniff_delimiter(text)
    records = _csv_records(text, name, delimiter)
    first = next(records, None)
    if first is None:
        raise DataError(f"{name}: empty file, expected a header row")
    header_line, header = first[0], [field.strip() for field in first[1]]
    # A delimiter at the end of every line (some exporters do this) makes an unnamed,
    # empty last column: tolerate it, while a non-empty value there is still an error.
    trailing = len(header) > 1 and header[-1] == ""
    if trailing:
        header = header[:-1]
    names, positions = _csv_header(header, header_line, name, cols)
    n_fields = len(header)
    offset = len(cols.roles)  # label, time?, group?: the text columns, then the features
    if '"' not in text and decimal_mark(delimiter) == "." and not trailing:
        plain = _plain_rows(text, header_line, n_fields, delimiter, positions, offset)
        if plain is not None:
            lines_of, text_cells, x = plain
            return _raw_csv(lines_of, text_cells, x, None, names, cols, ".")
    lines: list[int] = []
    text_columns: list[list[str]] = [[] for _ in cols.roles]
    cells = _Cells(names, "column", decimal_mark(delimiter), name, cols.exclude)
    quoted = '"' in text  # only a quoted value can hold a line break
    for line, fields in records:
        if trailing and len(fields) == n_fields + 1 and not fields[-1].strip():
            fields.pop()
        if len(fields) != n_fields:
            if any("\n" in field or "\r" in field for field in fields):
                raise DataError(f"{name}:{line}: {UNTERMINATED}")
            raise DataError(
                f"{name}:{line}: expected {n_fields} fields as in the header, found "
                f"{len(fields)} (a value holding the delimiter {delimiter!r} needs quotes; "
                "else a cell is missing or extra in this row)"
            )
        if quoted:
            _no_line_breaks(fields, positions, header, name, line)
        lines.append(line)
        for values, i in zip(text_columns, positions, strict=False):
            values.append(fields[i].strip())
        cells.add(line, [fields[i] for i in positions[offset:]])
    if not lines:
        raise DataError(f"{name}:{header_line}: header only, no data rows")
    x, x_error = cells.done()
    return _raw_csv(np.asarray(lines, dtype=np.int64), text_columns, x, x_error, names, cols,
                    cells.decimal)


def _raw_csv(
    lines: np.ndarray, text_columns: Sequence[Sequence[str]], x: np.ndarray | None,
    x_error: _RowError | None, names: list[str], cols: Columns, decimal: str,
) -> _Raw:
    by_role = dict(zip((role for role, _ in cols.roles), text_columns, strict=True))
    if "time" in by_role and decimal == ",":  # '5,6' seconds, as the features read
        by_role["time"] = [_point_decimal(t) for t in by_role["time"]]
    if decimal == ",":
        by_role["label"] = _comma_wholes(by_role["label"])
    return _Raw(
        lines=lines,
        labels=by_role["label"],
        x=x,
        x_error=x_error,
        times=by_role.get("time"),
        features=names,
        what="column",
        groups=by_role.get("group"),
    )


def _plain_rows(
    text: str, header_line: int, n_fields: int, delimiter: str, positions: list[int],
    offset: int,
) -> tuple[np.ndarray, list[list[str]], np.ndarray] | None:
    """The rows of a file without quotes, read by numpy's C parser: (line numbers, the
    stripped text columns, float32 features), or None if any row needs the careful reader.

    A file without a '"' has one record a line, so its records are its lines, and a
    delimiter only ever separates. The careful reader walks the rows in Python (3.5x
    slower on a 1.5M-row file, `bench/csv_load.py`); it runs only when this one finds
    something to report (a ragged row, a cell that is no finite number) and names it.
    The text goes a block of lines at a time, so its lines are never all Python strings."""
    if "\r" in text and text.count("\r") != text.count("\r\n"):
        return None  # a lone \r ends a line for csv, not for numpy
    pos = 0
    for _ in range(header_line):  # past the header (and the blank lines, or `sep=`, above)
        pos = text.find("\n", pos) + 1
        if pos == 0:
            return None  # no line after the header: the careful reader says so
    line, lines, xs, texts = header_line + 1, [], [], []
    while pos < len(text):
        end = text.find("\n", pos + _PLAIN_BLOCK)
        end = len(text) if end < 0 else end + 1
        chunk = text[pos:end]
        rows = chunk.split("\n")  # rows[i] is line `line + i`
        if text[end - 1] == "\n":
            rows.pop()  # the '' after the block's last line break
        odd = not chunk.isascii() or _CONTROL.search(chunk) is not None
        block = _plain_block(rows, n_fields, delimiter, positions, offset, odd)
        if block is None:
            return None
        data, x, cells = block
        lines.append(np.flatnonzero(data) + line)
        xs.append(x)
        texts.append(cells)
        line, pos = line + len(rows), end
    numbers = np.concatenate(lines) if lines else np.zeros(0, dtype=np.int64)
    if not len(numbers):
        return None
    columns = [np.char.strip(np.concatenate([t[:, j] for t in texts])).tolist()
               for j in range(offset)]
    return numbers, columns, np.concatenate(xs)


_PLAIN_BLOCK = 1 << 23  # characters of text a block of `_plain_rows` takes (8 MB or so)
_CONTROL = re.compile(r"[\x01-\x08\x0b\x0c\x0e-\x1f]")  # in no number numpy and Python share


def _plain_block(
    rows: list[str], n_fields: int, delimiter: str, positions: list[int], offset: int,
    odd: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """One block's (which rows hold data, float32 features, text cells), or None. `odd`:
    the block has characters beyond printable ASCII, which numpy's C parser reads in
    numbers more freely than the careful reader: a feature cell with one goes there."""
    widths = np.fromiter(map(methodcaller("count", delimiter), rows), np.int64, len(rows))
    data = widths > 0  # a line with no delimiter is blank, or ragged (n_fields >= 2)
    if (widths[data] != n_fields - 1).any():
        return None
    if not data.all() and any(rows[i].strip() for i in np.flatnonzero(~data)):
        return None
    kept = list(compress(rows, data)) if not data.all() else rows
    try:
        x = _loadtxt(kept, delimiter, positions[offset:], np.float64)
    except ValueError:  # rows of empty cells (,,,: skipped), or a cell that is no number
        empty = [i for i in np.flatnonzero(data) if not rows[i].replace(delimiter, "").strip()]
        if not empty:
            return None  # the careful reader names the cell
        data[empty] = False
        kept = list(compress(rows, data))
        try:
            x = _loadtxt(kept, delimiter, positions[offset:], np.float64)
        except ValueError:
            return None
    if odd and kept:
        codes = np.ascontiguousarray(_loadtxt(kept, delimiter, positions[offset:], np.str_))
        codes = codes.view(np.uint32)
        if ((codes > 126) | ((codes < 32) & (codes != 0))).any():  # 0: numpy's padding
            return None
    cells = _loadtxt(kept, delimiter, positions[:offset], np.str_)
    with np.errstate(over="ignore"):
        x = x.astype(np.float32)
    if not np.isfinite(x).all():
        return None
    return data, x, cells


def _loadtxt(rows: list[str], delimiter: str, columns: list[int], dtype: type) -> np.ndarray:
    """Columns of `rows` as a 2-D array (none when there are no rows)."""
    if not rows:
        return np.zeros((0, len(columns)), dtype=dtype)
    return np.loadtxt(rows, delimiter=delimiter, comments=None, ndmin=2, usecols=columns,
                      dtype=dtype)


# -------------------------------------------------------------------------------- jsonl


def _json_object(raw: str, line: int, name: str) -> dict[str, Any]:
    try:
        obj = json.loads(raw, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        detail = f"{exc.msg} (at character {exc.colno})"
        if line == 1 and raw.lstrip().startswith("["):
            detail += f"; {_ARRAY_HINT}"
        raise DataError(f"{name}:{line}: invalid JSON: {detail}") from exc
    except _DuplicateKey as exc:
        raise DataError(f"{name}:{line}: key {exc.args[0]!r} appears twice in one record") from None
    if not isinstance(obj, dict):
        hint = f"; {_ARRAY_HINT}" if isinstance(obj, list) else ""
        raise DataError(
            f"{name}:{line}: expected a JSON object, got {type(obj).__name__}{hint}"
        )
    return obj


_ARRAY_HINT = (
    "a JSON array of records is not JSON Lines, which holds one object per line: convert "
    "it, e.g. jq -c '.[]' data.json > data.jsonl"
)


def _a_number(text: str) -> bool:
    """Written as a measurement is (not 'nan', 'inf' or a pandas column index like '0')."""
    return bool(_MEASUREMENT.match(text.strip()))


_MEASUREMENT = re.compile(r"^[-+]?\d*[.,]\d+$|^[-+]?\d+[.,]\d*$")


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON allows a key twice and keeps the last; a record that does is a broken export
    (CSV's duplicate headers are refused too)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


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
        raise DataError(f"{name}:{line}: key {key!r}: missing value (null)")
    raise DataError(f"{name}:{line}: key {key!r}: {value!r} is not a valid value")


def _read_jsonl(text: str, name: str, cols: Columns) -> _Raw:
    label, features, time, exclude = cols.label, cols.features, cols.time, cols.exclude
    group = cols.group
    lines: list[int] = []
    labels: list[str] = []
    cells: list[list[Any]] = []
    times: list[str] = []
    groups: list[str] = []
    names: list[str] | None = list(features) if features is not None else None
    exact: set[str] | None = None  # with features=None every record must have these keys
    unseen = set(exclude)  # excluded keys no record has had yet: misspelt, if none ever has
    first_keys: list[str] = []
    problems: list[_RowError] = []  # records refused whole: all said at once, in file order
    for line, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            obj = _json_object(raw, line, name)
        except DataError as exc:
            problems.append(_RowError(str(exc), line))
            continue
        if names is None:
            names = [k for k in obj if k not in (label, time, group, *exclude)]
            exact = set(obj) - set(exclude)  # an excluded key may come and go
            first_keys = list(obj)
            if not names:
                raise DataError(f"{name}:{line}: no feature keys besides {label!r}")
        required = [col for _, col in cols.roles] + names
        for key in required:
            if key not in obj:
                shown = ", ".join(repr(k) for k in obj) + _did_you_mean(key, list(obj))
                had = exact is not None and key in exact
                first = " (the first record has it: every record needs its keys)" if had else ""
                problems.append(_row_error(
                    name, line, f"missing key {key!r}{first}; available: {shown}"))
                break
        else:
            if unseen:
                unseen.difference_update(obj)
            extra = [] if exact is None or len(obj) == len(exact) else [
                k for k in obj if k not in exact and k not in exclude]
            if extra:
                leave = json.dumps([*exclude, *extra])
                problems.append(_row_error(
                    name, line, f"unexpected key {extra[0]!r} (not in the first record): "
                    f"to leave it out, --set 'stream.exclude={leave}' (every record needs "
                    "the keys it uses)"))
                continue
            try:
                text_values = [_json_text(obj[label], name, line, label),
                               _time_text(obj[time], name, line, time) if time else "",
                               _json_text(obj[group], name, line, group) if group else ""]
            except DataError as exc:
                problems.append(_RowError(str(exc), line))
                continue
            lines.append(line)
            labels.append(text_values[0])
            cells.append([obj[k] for k in names])
            if time is not None:
                times.append(text_values[1])
            if group is not None:
                groups.append(text_values[2])
    if names is None or not lines:
        if problems:
            raise _earliest(problems)
        raise DataError(f"{name}: no records (the file is empty or blank)")
    if unseen:
        key = next(k for k in exclude if k in unseen)
        shown = ", ".join(repr(k) for k in first_keys)
        raise DataError(f"{name}:{lines[0]}: excluded key {key!r} not found in any record"
                        f"{_did_you_mean(key, first_keys)}; the first has: {shown}")
    block = _Cells(names, "key", ".", name, cols.exclude)
    for line, row in zip(lines, cells, strict=True):
        block.add(line, row)
    x, x_error = block.done()
    return _Raw(
        lines=np.asarray(lines, dtype=np.int64),
        labels=labels,
        x=x,
        x_error=x_error,
        times=times if time is not None else None,
        features=names,
        what="key",
        groups=groups if group is not None else None,
        problems=problems,
    )


_COMMA_WHOLE = re.compile(r"[+-]?\d+,0*")


def _comma_wholes(values: Sequence[str]) -> Sequence[str]:
    """'1,0' in a decimal-comma file is the class 1, as '1.0' is elsewhere (a label column
    that passed through a float column). Checked once per distinct value."""
    distinct, where = np.unique(np.asarray(values, dtype=np.str_), return_inverse=True)
    texts = distinct.tolist()
    fixed = [v.replace(",", ".") if _COMMA_WHOLE.fullmatch(v) else v for v in texts]
    return values if fixed == texts else np.asarray(fixed, dtype=np.str_)[where].tolist()


def _point_decimal(text: str) -> str:
    """A number written with a decimal comma ('5,6'), with a point; anything else as is."""
    whole, comma, fraction = text.partition(",")
    if comma and whole.lstrip("+-").isdigit() and fraction.isdigit():
        return f"{whole}.{fraction}"
    return text


def _time_text(value: Any, name: str, line: int, key: str) -> str:
    if isinstance(value, bool):
        raise DataError(f"{name}:{line}: key {key!r}: {json.dumps(value)} is not a time")
    return _json_text(value, name, line, key)


# ------------------------------------------------------------------------- shared building


def _build(raw: _Raw, name: str, cols: Columns, classes: Sequence[str] | None) -> Table:
    """Convert the raw cells; if several checks fail, report the problem nearest the top
    of the file, which is where someone fixing the file by hand will start."""
    failures: list[_RowError] = []

    def attempt(check: Callable[[], _T]) -> _T | None:
        try:
            return check()
        except _RowError as exc:
            failures.append(exc)
            return None

    failures.extend(raw.problems)
    if raw.x_error is not None:
        failures.append(raw.x_error)
    x = raw.x
    label, time = cols.label, cols.time
    labels = attempt(lambda: _encode_labels(raw.labels, raw, name, label, classes))
    grouped = None
    if cols.group is not None and raw.groups is not None:
        groups = raw.groups
        grouped = attempt(lambda: _encode_labels(groups, raw, name, str(cols.group), None, "value"))
    stamps = None
    if time is not None and raw.times is not None:
        times = raw.times
        stamps = attempt(lambda: _parse_times(times, raw.lines, name, f"{raw.what} {time!r}"))
    if failures:
        raise _earliest(failures) from None
    assert x is not None and labels is not None
    y, class_names = labels
    g, group_names = grouped if grouped is not None else (None, None)
    if stamps is not None:
        order = np.argsort(stamps, kind="stable")
        x, y, stamps = x[order], y[order], stamps[order]
        g = g[order] if g is not None else None
    return Table(x=x, y=y, classes=class_names, features=raw.features, time=stamps, groups=g,
                 group_names=group_names)


class _RowError(DataError):
    """A DataError that remembers its line, so the earliest of several can be reported."""

    def __init__(self, message: str, line: int) -> None:
        super().__init__(message)
        self.line = line


def _earliest(problems: list[_RowError]) -> DataError:
    """The problem nearest the top of the file, and where the next one is: a file is
    fixed from the top, and knowing of the others saves a run per problem. (Not a count:
    a column's cells are checked up to its first bad one.)"""
    ordered = sorted(problems, key=lambda exc: exc.line)
    more = "" if len(ordered) == 1 else (
        f"\n(more problems below it: the next at line {ordered[1].line})")
    return DataError(f"{ordered[0]}{more}")


def _row_error(name: str, line: int | np.integer, text: str) -> _RowError:
    return _RowError(f"{name}:{int(line)}: {text}", int(line))


class _Cells:
    """Feature cells, converted to float32 a block of rows at a time as they are read.

    Only a block that fails to convert (or holds NaN/inf) is scanned cell by cell, to
    name the first offending cell; the blocks after it are not converted at all.
    """

    BLOCK = 1 << 15  # rows

    def __init__(
        self, features: list[str], what: str, decimal: str, name: str,
        excluded: Sequence[str] = (),
    ) -> None:
        self.features, self.what, self.decimal, self.name = features, what, decimal, name
        self.excluded = list(excluded)  # already left out: a suggested exclude keeps them
        self.marks = DecimalMarks(features) if decimal == "," else None
        self.blocks: list[np.ndarray] = []
        self.rows: list[list[Any]] = []
        self.lines: list[int] = []
        self.error: _RowError | None = None

    def add(self, line: int, row: list[Any]) -> None:
        if self.error is None:
            self.rows.append(row)
            self.lines.append(line)
            if len(self.rows) >= self.BLOCK:
                self._convert()

    def done(self) -> tuple[np.ndarray | None, _RowError | None]:
        if self.rows and self.error is None:
            self._convert()
        if self.error is not None:
            return None, self.error
        return np.concatenate(self.blocks) if len(self.blocks) > 1 else self.blocks[0], None

    def _convert(self) -> None:
        rows, lines, first = self.rows, self.lines, not self.blocks
        self.rows, self.lines = [], []
        n, d = len(rows), len(self.features)
        if self.what == "key":
            values = _json_to_float(rows)
        else:
            cells = np.asarray(rows, dtype=np.str_).reshape(n, d)
            ambiguous = self.marks.problems(cells, lines) if self.marks else {}
            if ambiguous:
                i, problem = next(iter(ambiguous.items()))
                self.error = _row_error(self.name, lines[i], problem)
                return
            values = _text_to_float(cells, self.decimal)
        if values is not None:
            with np.errstate(over="ignore"):
                x = values.reshape(n, d).astype(np.float32)
            if np.isfinite(x).all():
                self.blocks.append(x)
                return
        for i, row in enumerate(rows):
            for j, cell in enumerate(row):
                problem = _cell_problem(cell, self.what, self.decimal)
                if problem:
                    where = f"{self.what} {self.features[j]!r}"
                    hint = ""
                    if problem.endswith("is not a number"):
                        hint = _column_hint(cell, self.features[j], first and i == 0)
                    problem += hint
                    # A header row again: every column's cell is its name, one fix for all.
                    report = "" if hint == REPEATED_HEADER else self._columns_report(rows, lines)
                    self.error = _row_error(self.name, lines[i], f"{where}: {problem}{report}")
                    return
        raise AssertionError("unreachable: conversion failed but every cell is fine")

    def _columns_report(self, rows: list[list[Any]], lines: list[int]) -> str:
        """Every feature column in these rows with cells that are no number, at once, with
        what to do about each: fixing a file one error a run takes as many runs as it has
        bad columns. Empty when the first problem is the only one."""
        said, leave_out = [], []
        total = 0
        for j, name in enumerate(self.features):
            column = [row[j] for row in rows]
            if self.what == "column":
                parsed = _text_to_float(np.asarray(column, dtype=np.str_)[:, None], self.decimal)
                if parsed is not None and np.isfinite(parsed).all():
                    continue  # the common case: the whole column reads, at numpy's speed
            problems = [(i, _cell_problem(cell, self.what, self.decimal))
                        for i, cell in enumerate(column)]
            bad = [(i, p) for i, p in problems if p]
            if not bad:
                continue
            total += len(bad)
            missing = sum(p.startswith("missing") for _, p in bad)
            text = [i for i, p in bad if not p.startswith("missing")]
            kinds = ", ".join(filter(None, [
                f"{missing} missing" if missing else "",
                f"{len(text)} not numbers (e.g. {str(column[text[0]])[:30]!r})" if text else "",
            ]))
            advice = _column_advice(column, bad, len(rows), name)
            if advice == NO_FEATURE:
                leave_out.append(name)
            said.append(f"{self.what} {name!r}: {kinds} of {len(rows)} rows, first at line "
                        f"{lines[bad[0][0]]}; {advice}")
        if len(said) < 2 and total < 2:
            return ""
        if leave_out:
            said.append("to leave those out: --set 'stream.exclude=[" + ", ".join(
                json.dumps(name) for name in [*self.excluded, *leave_out]) + "]'")
        return (f"\n  all the feature columns with such cells, in lines {lines[0]} to "
                f"{lines[-1]}:\n    " + "\n    ".join(said))


NO_FEATURE = "no feature: leave it out (stream.exclude)"
_WRITTEN_NUMBER = re.compile(
    r"^[-+]?\d{1,3}([.,\u00a0' ]\d{3})*,\d+$"  # 1.013,33  12 345,5
    r"|^[-+]?\d+,\d+$"  # 0,94
    r"|^[-+]?\d{1,3}([.\u00a0' ]\d{3})+$"  # 1.234.567  12 345
)


def _column_advice(column: list[Any], bad: list[tuple[int, str]], rows: int, name: str) -> str:
    """What to do about a column's unreadable cells: a column that is mostly text or
    mostly empty is no feature (leave it out); a few bad cells are those rows' to fix."""
    text = [column[i] for i, p in bad if not p.startswith("missing")]
    if text and isinstance(text[0], str) and _iso_time(text[0].strip()):
        return f'a time column? name it: stream.time = "{name}"'
    written = [v for v in text if isinstance(v, str) and _WRITTEN_NUMBER.match(v.strip())]
    if text and len(written) >= 0.9 * len(text):
        # Numbers, written with a decimal comma or thousands marks: no reason to drop them.
        return ("numbers written with a decimal comma or thousands marks: write them plainly "
                "(1013.33) rather than leave the column out")
    if 2 * len(bad) >= rows:
        return NO_FEATURE
    return "drop or fix those rows (values are not imputed)"


REPEATED_HEADER = "; this row repeats the header (files joined whole?): keep one header row"


def _column_hint(cell: Any, column: str, first_row: bool) -> str:
    """What to do about a text cell in a feature column: a repeated header (files joined
    with `cat`), a time column not named as one, or a text column to leave out."""
    text = str(cell).strip()
    if text == column:
        return REPEATED_HEADER
    if "-" in text[1:] and _iso_time(text):  # a bare year, or a number, is not one
        return f'; a time column? name it: stream.time = "{column}"'
    if first_row:  # an ID, a name
        return "; to leave a text column out, name it in stream.exclude"
    return ""


def _iso_time(text: str) -> bool:
    """Whether `stream.time` would read `text` as a date-time."""
    try:
        _iso_seconds(text)
    except ValueError:
        return False
    return True


class DecimalMarks:
    """Numbers that read two ways in a file whose decimal mark may be a comma (';' files).

    Such a file takes '19,87' and '19.87' alike, which is right for one written by a
    spreadsheet (commas) or a program (points), and wrong for '1.013' in a German export,
    where the point groups thousands: read as 1.013 it is silently a thousand times too
    small. So the first mark in a column fixes it (a cell with the other is refused), and
    once the file has a decimal comma, a number grouped like thousands with points
    ('1.013', '12.500') is refused. Rows come in blocks, as a file is read or fed.
    """

    def __init__(self, features: list[str]) -> None:
        self.features = features
        self.mark: dict[int, tuple[str, int, str]] = {}  # column -> (mark, line, cell)
        self.comma: tuple[int, str] | None = None  # the file's first decimal comma

    def problems(self, cells: np.ndarray, lines: Sequence[int]) -> dict[int, str]:
        """Row index -> why, for the rows of this block (n x d strings) with a number that
        reads two ways; the block's first marks are remembered for the blocks after."""
        comma = np.char.find(cells, ",") >= 0
        point = np.char.find(cells, ".") >= 0
        # A cell with both ('1.234,5') is no number at all: the parser says so.
        masks = {",": comma & ~point, ".": point & ~comma}
        found: dict[int, str] = {}
        for j in np.flatnonzero((masks[","] | masks["."]).any(axis=0)):
            j = int(j)
            if j not in self.mark:
                i = int(np.argmax(masks[","][:, j] | masks["."][:, j]))
                mark = "," if masks[","][i, j] else "."
                self.mark[j] = (mark, lines[i], str(cells[i, j]).strip())
            mark, line, first = self.mark[j]
            other = "." if mark == "," else ","
            for i in np.flatnonzero(masks[other][:, j]):
                found.setdefault(int(i), (
                    f"column {self.features[j]!r}: {str(cells[i, j]).strip()!r} has a decimal "
                    f"{'point' if other == '.' else 'comma'}, but the column's first number "
                    f"with a mark, {first!r} (line {line}), has a "
                    f"{'comma' if mark == ',' else 'point'}; in a ';'-separated file either "
                    "may be the decimal mark, so one may be a thousands separator: write the "
                    "column with one mark"
                ))
        if self.comma is None and masks[","].any():
            i, j = np.argwhere(masks[","])[0]
            self.comma = (lines[int(i)], str(cells[i, j]).strip())
        if self.comma is not None:
            line, c = self.comma
            points = np.argwhere(masks["."])  # few in a comma file, if any
            grouped = _grouped_like_thousands(cells[masks["."]])
            for i, j in points[grouped]:
                cell = str(cells[i, j]).strip()
                found.setdefault(int(i), (
                    f"column {self.features[j]!r}: {cell!r} reads as {float(cell):g} with "
                    f"a decimal point, but this file writes decimals with a comma ({c!r}, "
                    f"line {line}): if it means {cell.replace('.', '').lstrip('+')}, "
                    "write it without the point"
                ))
        return dict(sorted(found.items()))


def _grouped_like_thousands(cells: np.ndarray) -> np.ndarray:
    """Which cells are 1 to 3 digits, a point and 3 digits ('1.013', '-12.500'), in numpy
    string operations ('1.000.000' is no number at all: the parser says so)."""
    if not cells.size:  # numpy's partition cannot take none
        return np.zeros(cells.shape, dtype=bool)
    head, _, tail = np.moveaxis(np.char.partition(np.char.strip(cells), "."), -1, 0)
    head = np.char.lstrip(head, "+-")
    width = np.char.str_len(head)
    return (
        (width >= 1) & (width <= 3) & np.char.isdigit(head)
        & (np.char.str_len(tail) == 3) & np.char.isdigit(tail)
    )


def _text_to_float(cells: np.ndarray, decimal: str = ".") -> np.ndarray | None:
    if decimal == ",":  # one comma in a cell is its decimal point; two make no number
        one = np.char.count(cells, ",") == 1
        if one.any():
            cells = np.where(one, np.char.replace(cells, ",", "."), cells)
    try:
        values = cells.astype(np.float64)
    except ValueError:
        values = _booleans_to_float(cells)
    return None if values is None or _python_only_numbers(cells) else values


# Unicode's spaces beyond ASCII (no-break, ideographic, ...): padding, as numpy reads them.
_SPACES = np.array([c for c in range(128, 0x3001) if chr(c).isspace()], dtype=np.uint32)


def _python_only_numbers(cells: np.ndarray) -> bool:
    """Cells that only Python's float() reads as numbers: '1_000' (its digit grouping) and
    digits of other scripts ('١٢' is 12). No spreadsheet writes either; read, a '1_000'
    that was meant as text would silently become a feature of 1000. Checked on the
    characters' code points, in one pass over the block's buffer."""
    if not cells.size or cells.dtype.kind != "U" or cells.dtype.itemsize == 0:
        return False
    codes = np.ascontiguousarray(cells).view(np.uint32)
    odd = (codes == ord("_")) | ((codes > 127) & ~np.isin(codes, _SPACES))
    return bool(odd.any())


def _booleans_to_float(cells: np.ndarray) -> np.ndarray | None:
    """A block that is numbers and true/false (any case: pandas writes True, spreadsheets
    TRUE) with true as 1 and false as 0, or None. Only tried once the fast parse fails,
    and column by column: the text work runs on the columns that need it, not the block."""
    columns = cells.reshape(len(cells), -1)
    out = np.empty(columns.shape, dtype=np.float64)
    for j in range(columns.shape[1]):
        column = columns[:, j]
        try:
            out[:, j] = column.astype(np.float64)
            continue
        except ValueError:
            pass
        words = np.char.lower(np.char.strip(column))
        truth, untruth = words == "true", words == "false"
        if not (truth.any() or untruth.any()):
            return None
        try:
            out[:, j] = np.where(truth, "1", np.where(untruth, "0", column)).astype(np.float64)
        except ValueError:
            return None
    return out.reshape(cells.shape)


def _json_to_float(cells: list[list[Any]]) -> np.ndarray | None:
    """Fast path: plain ints, floats and booleans (true is 1) only (strings and nulls take
    the slow path)."""
    if not set(map(type, chain.from_iterable(cells))) <= {int, float, bool}:
        return None
    try:
        return np.asarray(cells, dtype=np.float64)
    except OverflowError:
        return None


def _cell_problem(cell: Any, what: str, decimal: str = ".") -> str | None:
    """Why one cell cannot be a feature value, or None if it can (a CSV cell read with
    the file's `decimal` mark, as `_text_to_float` reads it)."""
    if what == "key":
        if cell is None:
            return "missing value (null); values are not imputed: drop or fill that record"
        if isinstance(cell, str):
            return f"{cell!r} is not a number (it is a JSON string)"
        if not isinstance(cell, int | float):
            return f"{json.dumps(cell)} is not a number"
        try:
            number = float(cell)
        except OverflowError:
            number = math.inf
    else:
        raw, cell = cell, cell.strip()
        if cell.lower() in MISSING:
            return f"missing value {cell!r}; values are not imputed: drop or fill that row"
        # The bulk parser, on the cell as it is: str.strip() takes more than numpy does
        # ('2\x1c' is no number to numpy; stripped, it would look like one).
        values = _text_to_float(np.asarray([raw]), decimal)
        if values is None:
            if "_" in cell and cell.replace("_", "").replace(".", "", 1).isdigit():
                return f"{cell!r} is not a number: write it without the '_'"
            if any(ch.isdigit() and not ch.isascii() for ch in cell):
                return f"{cell!r} is not a number: write its digits as 0-9"
            plain = cell.replace(",", "", 1).lstrip("+-")
            if decimal == "." and "," in cell and plain.isascii() and plain.isdigit():
                return f"{cell!r} is not a number (a decimal comma is read in ';' files only)"
            if _THOUSANDS[decimal].fullmatch(cell):
                return f"{cell!r} has thousands separators; write numbers without them"
            return f"{raw.strip(' ')!r} is not a number"  # a control character shown
        number = float(values[0])
    if math.isnan(number):
        return f"missing value ({cell!r}); values are not imputed: drop or fill that row"
    if not abs(number) <= _F32_MAX:
        return f"{cell!r} is not a finite float32 number"
    return None


def _canonical_label(text: str) -> str:
    """Integers are compared by value, so '007', '7', '7.0' and '7.000e+00' are one class
    (files that were concatenated from two exports, passed through a float column, or
    written by numpy's `savetxt` mix them)."""
    if _INT_RE.fullmatch(text):
        return str(int(text))
    whole = _WHOLE_RE.fullmatch(text)
    if whole:
        return str(int(whole.group(1)))
    if _EXP_RE.fullmatch(text):
        value = decimal.Decimal(text)  # exact: no float rounding of 9007199254740993e0
        if value == value.to_integral_value():
            return str(int(value))
    return text


def _sort_classes(found: list[str]) -> list[str]:
    if all(_INT_RE.fullmatch(c) for c in found):
        return sorted(found, key=int)
    try:
        return sorted(found, key=float)
    except ValueError:
        return sorted(found)


def _encode_labels(
    texts: list[str],
    raw: _Raw,
    name: str,
    label: str,
    classes: Sequence[str] | None,
    role: str = "label",
) -> tuple[np.ndarray, list[str]]:
    """Text values (labels, or a group column's) as indices into their sorted names."""
    given = None if classes is None else [str(c) for c in classes]
    distinct, where = np.unique(np.asarray(texts, dtype=np.str_), return_inverse=True)
    canon = np.asarray([_canonical_label(s) for s in distinct.tolist()], dtype=np.str_)[where]
    allowed = set() if given is None else {_canonical_label(c) for c in given}
    missing = np.isin(np.char.lower(canon), list(MISSING - allowed))
    if missing.any():
        i = int(np.argmax(missing))
        raise _row_error(
            name, raw.lines[i], f"{raw.what} {label!r}: missing {role} {texts[i]!r}; rows "
            "are not imputed: drop that row, or give it its value"
        )
    found, inverse = np.unique(canon, return_inverse=True)
    if given is None and role == "label":
        _check_label_kinds(found.tolist(), inverse, texts, raw, name, label)
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
                raise _row_error(
                    name,
                    raw.lines[i],
                    f"{raw.what} {label!r}: unknown label "
                    f"{texts[i]!r}; expected one of {given}",
                )
    remap = np.asarray([lookup[c] for c in found.tolist()], dtype=np.int64)
    return remap[inverse.reshape(-1)], names


MISALIGNED_AT_LEAST = 20  # distinct numbers with fractions among names, to refuse them


def _fraction(text: str) -> bool:
    try:
        value = float(text)
    except ValueError:
        return False
    return math.isfinite(value) and value != round(value)


def _check_label_kinds(
    found: list[str], inverse: np.ndarray, texts: list[str], raw: _Raw, name: str, label: str
) -> None:
    """Names, and many more numbers with fractions, in one label column: the numbers are
    some other column's values, in rows whose columns do not line up with the header
    (two exports with different column orders joined whole). Each would become a class
    of its own. A few such labels (versions: '1.2', 'legacy') are classes, and pass."""
    fractions = [k for k, value in enumerate(found) if _fraction(value)]
    named = [value for value in found if not _fraction(value) and not _INT_RE.fullmatch(value)]
    if len(fractions) < MISALIGNED_AT_LEAST or not named or 2 * len(fractions) <= len(found):
        return
    odd = np.isin(inverse.reshape(-1), fractions)
    i = int(np.argmax(odd))
    raise _row_error(
        name, raw.lines[i],
        f"{raw.what} {label!r}: {texts[i]!r} is a number with a fraction where other rows' "
        f"labels are names ({', '.join(map(repr, named[:3]))}); {int(odd.sum())} rows' "
        "labels are such numbers: their columns may not line up with the header (files "
        "with different column orders joined whole? join them by column name); if they "
        "are classes, name them all in stream.classes",
    )


def _iso_seconds(text: str) -> float:
    stamp = datetime.fromisoformat(text)
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.timestamp()


def _parse_times(values: list[str], lines: np.ndarray, name: str, where: str) -> np.ndarray:
    """Numbers if the first value is one, else ISO-8601 date-times; never a mix."""
    missing = np.isin(np.char.lower(np.asarray(values, dtype=np.str_)), list(MISSING))
    if missing.any():
        i = int(np.argmax(missing))
        raise _row_error(name, lines[i], f"{where}: missing time {values[i]!r}")
    kinds = {float: "a number", _iso_seconds: "an ISO-8601 date-time"}
    try:
        float(values[0])
    except ValueError:
        parse, other = _iso_seconds, float
    else:
        parse, other = float, _iso_seconds
    stamps = np.empty(len(values), dtype=np.float64)
    one_by_one = values
    if parse is float:  # numbers all: one bulk parse, and the loop below only to name a bad one
        with contextlib.suppress(ValueError):
            stamps[:] = np.asarray(values, dtype=np.float64)
            one_by_one = []
    for i, value in enumerate(one_by_one):
        try:
            stamps[i] = parse(value)
        except ValueError:
            problem = f"{value!r} is not {kinds[parse]}"
            if parse is _iso_seconds:
                problem += " (write times as 2021-01-31T10:00:00, a zone optional, or as numbers)"
            with contextlib.suppress(ValueError):
                other(value)
                problem = (f"{value!r} is {kinds[other]}, where line {lines[0]} has "
                           f"{kinds[parse]} ({values[0]!r}): a time column takes one kind")
            raise _row_error(name, lines[i], f"{where}: {problem}") from None
    if not np.all(np.isfinite(stamps)):
        i = int(np.argmax(~np.isfinite(stamps)))
        raise _row_error(name, lines[i], f"{where}: {values[i]!r} is not a finite time")
    return stamps
