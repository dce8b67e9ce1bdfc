"""Reading a CSV or JSONL stream for ``fedstream feed``, row by row, into sample batches.

The file rules are those of ``load_table`` (``sources/tabular.py``, whose helpers this
reuses): UTF-8 with or without a BOM, a sniffed delimiter among ``, ; tab |`` (decimal
commas in a ``;`` file), quoted fields, CRLF, ``.gz``, blank lines, a trailing delimiter on
every line; an empty or NA cell, a non-number, a ragged row, a missing key or bad JSON is an
error naming ``file:line`` and the column. Unlike ``load_table``, which refuses a whole
file for one bad cell, a feed reports the bad row and goes on: the good rows are sent, so a
live stream does not stop for one garbled record, nor for one line that is not UTF-8 (a
byte of another encoding pasted into a log). Problems with the file as a whole (unreadable,
bad header, label column missing, a header that is not UTF-8) still stop it with a
``DataError``.

The input is read as a stream (stdin may be a live pipe): a batch is emitted when it holds
``batch`` rows, or ``flush_seconds`` after its first row, whether or not more rows come (a
pipe is read on a thread of its own, so a quiet ``tail -f`` does not hold back the end of
a burst).

Labels are integer class indices, or names listed in ``classes`` (their index is the
label).
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import os
import queue
import re
import stat
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain, islice
from typing import IO, Any, Literal

import numpy as np

from fedstream.client.sources.base import DataError
from fedstream.client.sources.tabular import (
    _INT_RE,
    BOM,
    GZIP_MAGIC,
    MISSING,
    UNTERMINATED,
    Columns,
    DecimalMarks,
    _canonical_label,
    _cell_problem,
    _csv_header,
    _is_blank,
    _iso_time,
    _json_object,
    _json_text,
    _json_to_float,
    _sniff_delimiter,
    _text_to_float,
    decimal_mark,
    detect_format,
    encoding_hint,
    excel_delimiter,
    text_encoding,
)

Format = Literal["auto", "csv", "jsonl"]


@dataclass
class Chunk:
    """Rows ready to send, and the rows of the same stretch refused here."""

    x: np.ndarray  # float32 (k, n_features)
    y: np.ndarray  # int64 (k,)
    lines: np.ndarray  # int64 (k,): the line each row starts on
    errors: list[str] = field(default_factory=list)  # "file:line: problem", in file order


class _RowProblem(Exception):
    pass


class _NamedLabel(_RowProblem):
    """A label that is a name where a class index was expected (no --classes)."""

    def __init__(self, message: str, label: str) -> None:
        super().__init__(message)
        self.label = label


class _Undecodable(str):
    """A line holding bytes its encoding cannot decode (kept as lone surrogates by
    `_escape_bytes`; valid text never decodes to one): that row's problem, not the file's,
    so the lines around it are still read."""


_ESCAPED = re.compile("[\udc00-\udcff]")
ESCAPE = "fedstream-escape"


def _escape_bytes(err: UnicodeError) -> tuple[str, int]:
    """Each undecodable byte as the lone surrogate U+DC00 + byte. Python's own
    `surrogateescape` refuses bytes below 0x80, which a UTF-16 stream can hold."""
    assert isinstance(err, UnicodeDecodeError)
    return "".join(chr(0xDC00 + b) for b in err.object[err.start : err.end]), err.end


codecs.register_error(ESCAPE, _escape_bytes)


TICK = None  # in the line and row streams: flush_seconds passed without a new line


def is_live(stream: IO[str]) -> bool:
    """Whether reading `stream` may block for new data (a pipe, a terminal, a socket),
    as opposed to a regular file, which ends."""
    try:
        return not stat.S_ISREG(os.fstat(stream.fileno()).st_mode)
    except (OSError, ValueError, io.UnsupportedOperation):
        return False


def open_input(path: str) -> tuple[IO[str], str]:
    """A text stream for ``path`` ("-": stdin) and the name used in messages."""
    if path == "-":
        import sys

        raw: IO[bytes] = sys.stdin.buffer
        name = "<stdin>"
    else:
        name = str(path)
        try:
            raw = open(path, "rb")  # noqa: SIM115
        except OSError as exc:
            raise DataError(f"{name}: cannot read file: {exc.strerror or exc}") from exc
    if hasattr(raw, "peek") and raw.peek(2)[:2] == GZIP_MAGIC:  # by content, stdin too
        raw = gzip.GzipFile(fileobj=raw)  # type: ignore[assignment]
    try:
        head = raw.peek(4)[:4] if hasattr(raw, "peek") else b""
    except (OSError, EOFError) as exc:
        raise DataError(f"{name}: not a valid gzip file: {exc}") from exc
    # Undecodable bytes become lone surrogates, so that the Reader can refuse their line
    # alone instead of the decoder stopping the whole stream there.
    encoding = text_encoding(head)
    return io.TextIOWrapper(raw, encoding, errors=ESCAPE, newline=""), name


PUMP = "feed-input"  # the thread reading a live input
EVIDENCE = 8  # rows alike in a mistake before it is the input's, said once, not each row's


def still_reading() -> bool:
    """Whether a live input is still being read (its thread blocked on a pipe that the
    writer has not closed)."""
    return any(t.name == PUMP and t.is_alive() for t in threading.enumerate())


_SCHEMA_RECORDS = 16  # a JSONL file's first records, whose commonest keys are its keys


def _commonest_keys(records: Sequence[tuple[int, str] | None]) -> list[str] | None:
    """The keys most of these JSONL records have (the earliest set on a tie), in the order
    the first record with them gives; None when none is a JSON object."""
    seen: dict[frozenset[str], list[str]] = {}
    counts: Counter[frozenset[str]] = Counter()
    for record in records:
        if record is None or isinstance(record[1], _Undecodable):
            continue
        try:
            obj = json.loads(record[1])
        except ValueError:
            continue
        if isinstance(obj, dict):
            keys = frozenset(obj)
            seen.setdefault(keys, list(obj))
            counts[keys] += 1
    if not counts:
        return None
    best = max(counts.values())
    return next(seen[k] for k in seen if counts[k] == best)


class Reader:
    """Iterate ``Chunk``s of a CSV/JSONL text stream (see the module docstring)."""

    def __init__(
        self,
        stream: IO[str],
        name: str,
        *,
        path: str = "-",
        label: str = "label",
        features: Sequence[str] | None = None,
        fmt: Format = "auto",
        classes: Sequence[str] | None = None,
        batch: int = 4096,
        flush_seconds: float = 1.0,
        stop: threading.Event | None = None,
    ) -> None:
        if features is not None and label in features:
            raise ValueError(f"label column {label!r} must not also be listed in features")
        self.stream, self.name, self.path = stream, name, path
        self.label, self.fmt = label, fmt
        self.wanted = list(features) if features is not None else None
        self.classes = None
        if classes is not None:
            self.classes = {_canonical_label(str(c)): i for i, c in enumerate(classes)}
        self.batch, self.flush_seconds = max(1, batch), flush_seconds
        # Once set, the rows end at the next row or quiet tick: what was read is sent whole
        # (a stopped feed ends its stream, so the device says what it stored).
        self.stop = stop
        self.broke_off = False  # the stop came before the input's end
        self.features: list[str] = []  # resolved feature names
        self.kind: Literal["csv", "jsonl"] = "csv"
        self.decimal = "."  # the CSV's decimal mark, once its header is read
        self.marks: DecimalMarks | None = None  # numbers that read two ways (';' files)
        self.line = 0  # last line read
        self.header_line = 0  # a CSV's header (after blank lines, or Excel's `sep=` line)
        self._hinted = False  # the not-UTF-8 hint is given with the first such row only
        self._indexed = False  # some label was a class index (so names are row errors)
        self._numeric = False  # some row's features were numbers (so text is a row error)

    # ------------------------------------------------------------------------ lines

    def _lines(self) -> Iterator[str | None]:
        """The stream's lines, counting them, with a TICK whenever a live input is quiet
        for `flush_seconds`; a decoding error is a file error."""
        source = self._pumped() if is_live(self.stream) else self._read()
        for line in source:
            if line is not TICK:
                self.line += 1
            yield line

    def _read(self) -> Iterator[str]:
        while True:
            try:
                line = self.stream.readline()
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{self.name}:{self.line + 1}: not valid {self.stream.encoding}: "
                    f"{exc.reason}; {encoding_hint(exc.object[:4096])}"
                ) from None
            if not line:
                return
            if not line.isascii() and _ESCAPED.search(line):
                line = _Undecodable(line)
            yield line

    def _pumped(self) -> Iterator[str | None]:
        """Lines read on a daemon thread, so that waiting for the next one can time out."""
        lines: queue.Queue = queue.Queue(maxsize=65536)
        end = object()

        def pump() -> None:
            try:
                for line in self._read():
                    lines.put(line)
            except DataError as exc:
                lines.put(exc)
            lines.put(end)

        threading.Thread(target=pump, name=PUMP, daemon=True).start()
        while True:
            try:
                item = lines.get(timeout=self.flush_seconds)
            except queue.Empty:
                yield TICK
                continue
            if item is end:
                return
            if isinstance(item, DataError):
                raise item
            yield item

    def open(self) -> Iterator[Chunk]:
        """Read up to the header (CSV) or the first record (JSONL), raising ``DataError``
        for a bad one now, and return the iterator of the chunks that follow."""
        lines = self._lines()
        # A JSONL file has no header: when its name or --format says JSONL, a first record
        # that does not decode costs that row only, as any later one does.
        jsonl = detect_format(self.path, "", self.fmt) == "jsonl"
        first = self._first(lines, undecodable_ok=jsonl)
        if isinstance(first, _Undecodable):
            return self._chunks(self._jsonl_rows(first, self.line, lines))
        if "\x00" in first:
            hint = encoding_hint(first.encode())
            raise DataError(f"{self.name}:{self.line}: {hint}")
        delimiter = excel_delimiter(first)
        if delimiter is not None:  # Excel's `sep=;` line: the header comes next
            first = self._first(lines)
        start = self.header_line = self.line
        self.kind = "csv" if delimiter else detect_format(self.path, first, self.fmt)
        if self.kind == "csv":
            rows = self._csv_rows(lines, *self._csv_header(first, start, delimiter))
        else:
            rows = self._jsonl_rows(first, start, lines)
        return self._chunks(rows)

    def __iter__(self) -> Iterator[Chunk]:
        return self.open()

    def _first(self, lines: Iterator[str | None], undecodable_ok: bool = False) -> str:
        for line in lines:
            if isinstance(line, _Undecodable) and not undecodable_ok:
                raise DataError(f"{self.name}:{self.line}: {self._undecodable(line, True)}")
            if line is not TICK and line.startswith(BOM):  # one more than the codec drops
                line = type(line)(line.lstrip(BOM))  # (an _Undecodable stays one)
            if line is not TICK and line.strip():
                return line
        raise DataError(f"{self.name}: empty input, expected a header row or a record")

    def _undecodable(self, line: str, whole_file: bool = False) -> str:
        """What is wrong with a line that does not decode; the fix, the first time."""
        bad = _ESCAPED.search(line)
        assert bad is not None
        where = f"byte 0x{ord(bad.group()) - 0xDC00:02x} at character {bad.start() + 1}"
        encoding = self.stream.encoding or "utf-8"
        problem = f"not valid {encoding} ({where})"
        if self._hinted and not whole_file:
            return problem
        self._hinted = True
        if "16" in encoding:
            return (f"{problem}: the file starts with a UTF-16 byte-order mark, but this line "
                    "does not decode as UTF-16 (pasted in from a file in another encoding?)")
        return f"{problem}: {encoding_hint(line.encode('utf-8', 'surrogatepass'))}"

    # -------------------------------------------------------------------------- csv

    def _csv_header(
        self, text: str, line: int, delimiter: str | None = None
    ) -> tuple[str, list[int], int, bool]:
        delimiter = delimiter or _sniff_delimiter(text)
        header = next(csv.reader([text], delimiter=delimiter, skipinitialspace=True))
        header = [h.strip() for h in header]
        trailing = len(header) > 1 and header[-1] == ""
        if trailing:
            header = header[:-1]
        names, positions = _csv_header(header, line, self.name, Columns(self.label, self.wanted))
        self.features = names
        self.decimal = decimal_mark(delimiter)
        self.marks = DecimalMarks(names) if self.decimal == "," else None
        return delimiter, positions, len(header), trailing

    def _csv_rows(
        self, lines: Iterator[str | None], delimiter: str, positions: list[int], n_fields: int,
        trailing: bool,
    ) -> Iterator:
        # One line is one record: a quote left open on one line must cost that row only,
        # not swallow the rows after it (numbers and labels hold no line breaks).
        for text in lines:
            if text is TICK:
                yield TICK
                continue
            if isinstance(text, _Undecodable):
                yield self.line, self._undecodable(text)
                continue
            try:
                record = next(csv.reader((text,), delimiter=delimiter, skipinitialspace=True))
            except StopIteration:
                continue
            except csv.Error as exc:
                raise DataError(f"{self.name}:{self.line}: malformed CSV: {exc}") from None
            start = self.line
            if _is_blank(record):
                continue
            if any("\n" in field or "\r" in field for field in record):
                yield start, UNTERMINATED
                continue
            if trailing and len(record) == n_fields + 1 and not record[-1].strip():
                record.pop()
            if len(record) != n_fields:
                yield start, f"expected {n_fields} fields as in the header, found {len(record)}"
                continue
            yield start, (record[positions[0]].strip(), [record[i] for i in positions[1:]])

    # ------------------------------------------------------------------------ jsonl

    def _jsonl_rows(self, first: str, first_line: int, lines: Iterator[str | None]) -> Iterator:
        exact: set[str] | None = None
        names = self.wanted
        hinted = False

        def records() -> Iterator[tuple[int, str] | None]:
            yield first_line, first
            for text in lines:
                if text is TICK:
                    yield TICK
                elif isinstance(text, _Undecodable) or text.strip():
                    yield self.line, text

        source: Iterator[tuple[int, str] | None] = records()
        basis = "the first record"
        if names is None and not is_live(self.stream):
            # A file: its keys are those most of its first records share, so that one odd
            # first record costs its own row only, not every row after it.
            peeked = list(islice(source, _SCHEMA_RECORDS))
            schema = _commonest_keys(peeked)
            if schema is not None and [k for k in schema if k != self.label]:
                names = [k for k in schema if k != self.label]
                exact, self.features = set(schema), names
                basis = f"most of the first {len(peeked)} records"
            source = chain(peeked, source)
        for record in source:
            if record is TICK:
                yield TICK
                continue
            line, text = record
            if isinstance(text, _Undecodable):
                yield line, self._undecodable(text)
                continue
            try:
                obj = _json_object(text, line, self.name)
            except DataError as exc:
                problem = str(exc).removeprefix(f"{self.name}:{line}: ")
                if names is None and not hinted and not text.lstrip().startswith("{"):
                    hinted = True  # a CSV file read as JSONL: say so once, not per row
                    problem += (" (read as JSONL, one JSON object a line, because of "
                                f"{'--format jsonl' if self.fmt == 'jsonl' else 'its name'}"
                                ": is it CSV?)")
                yield line, problem
                continue
            if names is None:
                names = [k for k in obj if k != self.label]
                exact = set(obj)
                if not names:
                    raise DataError(f"{self.name}:{line}: no feature keys besides {self.label!r}")
                self.features = names
            elif not self.features:
                self.features = list(names)
            missing = next((k for k in [self.label, *names] if k not in obj), None)
            if missing is not None:
                shown = ", ".join(repr(k) for k in obj)
                yield line, f"missing key {missing!r}; available: {shown}"
                continue
            if exact is not None and len(obj) != len(exact):
                extra = next(k for k in obj if k not in exact)
                yield line, f"unexpected key {extra!r} (not in {basis})"
                continue
            try:
                label = _json_text(obj[self.label], self.name, line, self.label)
            except DataError as exc:  # null, a list, an object
                yield line, str(exc).removeprefix(f"{self.name}:{line}: ")
                continue
            yield line, (label, [obj[k] for k in names])

    # ----------------------------------------------------------------------- chunks

    def _chunks(self, rows: Iterator) -> Iterator[Chunk]:
        pending: list[tuple[int, Any]] = []
        began = time.monotonic()
        for item in rows:
            if self.stop is not None and self.stop.is_set():
                self.broke_off = True
                break
            if item is TICK:  # a live input went quiet: send what it gave so far
                if pending:
                    yield self._convert(pending)
                    pending = []
                continue
            if not pending:
                began = time.monotonic()
            pending.append(item)
            if len(pending) >= self.batch or time.monotonic() - began > self.flush_seconds:
                yield self._convert(pending)
                pending = []
        if pending:
            yield self._convert(pending)

    def _convert(self, rows: list[tuple[int, Any]]) -> Chunk:
        """Vectorised conversion of a batch of rows; on failure, rows one by one."""
        what = "column" if self.kind == "csv" else "key"
        errors: list[tuple[int, str]] = []
        lines: list[int] = []
        labels: list[int] = []
        cells: list[list[Any]] = []
        named: dict[str, int] = {}  # label names met where indices were expected: rows
        for line, row in rows:
            if isinstance(row, str):  # a problem found while reading
                errors.append((line, row))
                continue
            try:
                labels.append(self._label(row[0], what))
            except _NamedLabel as exc:
                errors.append((line, str(exc)))
                named[exc.label] = named.get(exc.label, 0) + 1
                continue
            except _RowProblem as exc:
                errors.append((line, str(exc)))
                continue
            lines.append(line)
            cells.append(row[1])
        # No label so far was an index, and enough rows named one that it is the input's
        # way, not one row's slip (a live input's first chunk may be a single row).
        if sum(named.values()) >= EVIDENCE and not self._indexed:
            self._names_not_indices(list(named), what)
        if self.marks is not None and cells and what == "column":
            ambiguous = self.marks.problems(np.asarray(cells, dtype=np.str_), lines)
            errors.extend((lines[i], text) for i, text in ambiguous.items())
            ok = [i for i in range(len(cells)) if i not in ambiguous]
            lines, labels, cells = ([v[i] for i in ok] for v in (lines, labels, cells))
        keep = np.ones(len(cells), dtype=bool)
        x = self._floats(cells, what, self.decimal)
        if x is None or not np.isfinite(x).all():
            failed: dict[int, Any] = {}  # column -> its first cell that is no number
            for i, row in enumerate(cells):
                for j, cell in enumerate(row):
                    with np.errstate(over="ignore"):
                        problem = _cell_problem(cell, what, self.decimal)
                    if problem is not None:
                        errors.append((lines[i], f"{what} {self.features[j]!r}: {problem}"))
                        failed.setdefault(j, cell)
                        keep[i] = False
                        break
            if len(failed) == 1 and len(cells) >= EVIDENCE and not keep.any() and not (
                self._numeric
            ):
                self._not_a_feature(*failed.popitem(), what)
            kept = [row for row, k in zip(cells, keep, strict=True) if k]
            x = self._floats(kept, what, self.decimal)
            assert x is not None
        self._numeric = self._numeric or bool(keep.any())
        errors.sort(key=lambda e: e[0])
        return Chunk(
            x=x.reshape(int(keep.sum()), len(self.features)),  # no features yet: no rows
            y=np.asarray(labels, dtype=np.int64)[keep],
            lines=np.asarray(lines, dtype=np.int64)[keep],
            errors=[f"{self.name}:{line}: {text}" for line, text in errors],
        )

    @staticmethod
    def _floats(cells: list[list[Any]], what: str, decimal: str) -> np.ndarray | None:
        if not cells:
            return np.empty((0,), dtype=np.float32)
        if what == "key":
            values = _json_to_float(cells)
        else:
            values = _text_to_float(np.asarray(cells, dtype=np.str_), decimal)
        if values is None:
            return None
        with np.errstate(over="ignore"):
            return values.astype(np.float32)

    def _not_a_feature(self, column: int, cell: Any, what: str) -> None:
        """No row so far had numbers for features, and in every row here one column was
        the one that was not: a text or time column, not a bad row. Said once."""
        name = self.features[column]
        kind = "date-times" if isinstance(cell, str) and _iso_time(cell) else "no numbers"
        others = [f for f in self.features if f != name]
        raise DataError(
            f"{self.name}: {what} {name!r} holds {kind} ({str(cell)[:40]!r}), in every row so "
            f"far, and features must be numbers: leave it out with --features "
            f"{','.join(others[:8])}{',...' if len(others) > 8 else ''} (a device's samples "
            "keep their arrival order; nothing of this input was stored)"
        )

    def _names_not_indices(self, names: list[str], what: str) -> None:
        """No label so far was a class index, and every row here named one: the input
        names its classes. Said once, for the input, not once a row."""
        shown = ",".join(sorted(names)[:20])
        raise DataError(
            f"{self.name}: the labels in {what} {self.label!r} are class names "
            f"({', '.join(repr(n) for n in names[:5])}{', ...' if len(names) > 5 else ''}), "
            "and without --classes labels are class indices (0, 1, ...): give every class, "
            f"in index order, e.g. --classes {shown} (the names seen so far, sorted; add any "
            "class these rows lack, and keep one order for every device)"
        )

    def _label(self, text: str, what: str) -> int:
        where = f"{what} {self.label!r}"
        if text.lower() in MISSING:
            raise _RowProblem(f"{where}: missing label {text!r}")
        canon = _canonical_label(text)
        if self.classes is not None:
            if canon not in self.classes:
                raise _RowProblem(
                    f"{where}: unknown label {text!r}; expected one of {list(self.classes)}"
                )
            return self.classes[canon]
        if not _INT_RE.fullmatch(canon):
            raise _NamedLabel(
                f"{where}: label {text!r} is not an integer class index "
                "(name the classes with --classes)",
                text,
            )
        self._indexed = True
        return int(canon)
