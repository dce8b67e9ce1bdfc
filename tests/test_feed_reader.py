"""fedstream feed's reader: a bad row costs that row, never the rows after it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedstream.client.feed import Reader, open_input
from fedstream.client.sources.base import DataError


def read_all(path: Path, **kw: object) -> tuple[np.ndarray, np.ndarray, list[str]]:
    stream, name = open_input(str(path))
    with stream:
        chunks = list(Reader(stream, name, path=str(path), **kw))  # type: ignore[arg-type]
    x = np.concatenate([c.x for c in chunks])
    y = np.concatenate([c.y for c in chunks])
    return x, y, [e for c in chunks for e in c.errors]


def test_an_unterminated_quote_costs_its_own_row_only(tmp_path: Path) -> None:
    path = tmp_path / "u.csv"
    path.write_text('a,b,label\n1,2,0\n"3,4,1\n5,6,0\n7,8,1\n')
    x, y, errors = read_all(path)
    assert errors == [f"{path}:3: " + errors[0].split(": ", 1)[1]]
    assert "unterminated quoted field" in errors[0]
    np.testing.assert_array_equal(x, [[1, 2], [5, 6], [7, 8]])
    np.testing.assert_array_equal(y, [0, 0, 1])


def test_excel_sep_line_and_float_written_labels(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_text("sep=;\r\nTemp;Status\r\n19,5;1.0\r\n20;0\r\n")
    x, y, errors = read_all(path, label="Status")
    assert errors == []
    np.testing.assert_allclose(x[:, 0], [19.5, 20.0])
    np.testing.assert_array_equal(y, [1, 0])


def test_utf16_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    path = tmp_path / "u16.txt"
    path.write_bytes("Temperatur °C\tlabel\r\n19.5\t1\r\n".encode("utf-16"))
    x, y, errors = read_all(path)
    assert errors == [] and y.tolist() == [1]
    np.testing.assert_allclose(x, [[19.5]])


def test_a_quiet_pipe_does_not_hold_back_the_rows_it_gave(tmp_path: Path) -> None:
    # `tail -f live.csv | fedstream feed -`: a burst of rows, then silence, with the pipe
    # still open. The rows must go out after flush_seconds, not when the next row comes.
    import io
    import os
    import time

    read_fd, write_fd = os.pipe()
    with os.fdopen(write_fd, "w") as writer, io.TextIOWrapper(
        os.fdopen(read_fd, "rb"), encoding="utf-8", newline=""
    ) as stream:
        writer.write("a,b,label\n1,2,0\n3,4,1\n")
        writer.flush()
        chunks = Reader(stream, "<stdin>", flush_seconds=0.2).open()
        began = time.monotonic()
        first = next(chunks)
        assert time.monotonic() - began < 5
        np.testing.assert_array_equal(first.x, [[1, 2], [3, 4]])
        writer.write("5,6,0\n")
        writer.close()
        assert [c.y.tolist() for c in chunks] == [[0]]


def test_a_number_that_reads_two_ways_costs_its_row_only(tmp_path: Path) -> None:
    # Fed rows cannot be taken back: the first mark in a column fixes it, and a later row
    # with the other mark (or a thousands-grouped '1.013' once the file has commas) is
    # refused, naming why, while the rows around it are kept.
    path = tmp_path / "de.csv"
    path.write_text("Druck;Temp;label\n998;18,0;0\n1.013;20,5;1\n1000;19.5;0\n1001;21,5;1\n")
    x, y, errors = read_all(path)
    np.testing.assert_allclose(x, [[998, 18.0], [1001, 21.5]])
    np.testing.assert_array_equal(y, [0, 1])
    assert [e.split(": ", 1)[0] for e in errors] == [f"{path}:3", f"{path}:4"]
    assert "'1.013' reads as 1.013" in errors[0] and "'19.5' has a decimal point" in errors[1]


def test_a_line_that_is_not_utf8_costs_its_own_row_only(tmp_path: Path) -> None:
    # A Windows-1252 byte deep in a long file: that row is refused at its own line, and
    # every row before and after it is read (the decoder does not stop the stream).
    rows = [f"{i},{i % 2}" for i in range(3000)]
    rows[2499] = "caf\xe9,1"  # line 2501
    path = tmp_path / "big.csv"
    path.write_bytes(("x,label\n" + "\n".join(rows) + "\n").encode("cp1252"))
    x, y, errors = read_all(path, batch=500)
    assert len(errors) == 1 and errors[0].startswith(f"{path}:2501: not valid utf-8-sig")
    assert "byte 0xe9 at character 4" in errors[0] and "Windows-1252" in errors[0]
    assert len(y) == 2999 and x[-1, 0] == 2999 and x[2498, 0] == 2498 and x[2499, 0] == 2500


def test_the_encoding_hint_comes_once_and_a_bad_header_stops_the_file(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    path.write_bytes(b'{"a": 1, "label": 0}\n{"a": 2, "label": "\xff"}\n{"a": 3, "label": 1}\n'
                     b'{"a": 4, "label": "\xfe"}\n')
    _, y, errors = read_all(path)
    assert [e.split(": ", 1)[0] for e in errors] == [f"{path}:2", f"{path}:4"]
    assert "Windows-1252" in errors[0] and errors[1].endswith("(byte 0xfe at character 20)")
    assert y.tolist() == [0, 1]

    first = tmp_path / "f.jsonl"  # JSONL has no header: its first record is a row like any
    first.write_bytes(b'{"a": 1, "label": "\xff"}\n{"a": 2, "label": 0}\n{"a": 3, "label": 1}\n')
    x, y, errors = read_all(first)
    assert [e.split(": ", 1)[0] for e in errors] == [f"{first}:1"] and "Windows-1252" in errors[0]
    assert y.tolist() == [0, 1] and x[:, 0].tolist() == [2, 3]

    bad = tmp_path / "h.csv"
    bad.write_bytes(b"temp \xb0C,label\n1,0\n")
    with pytest.raises(DataError, match=rf"{bad}:1: not valid utf-8-sig \(byte 0xb0"):
        read_all(bad)


def test_a_line_that_is_not_utf16_in_a_utf16_file_costs_its_own_row_only(tmp_path: Path) -> None:
    # A lone high surrogate before ASCII: bytes below 0x80 that surrogateescape would refuse.
    def u16(text: str) -> bytes:
        return text.encode("utf-16-le")

    path = tmp_path / "u16.csv"
    path.write_bytes(b"\xff\xfe" + u16("x,label\r\n1,0\r\n") + b"\x00\xd8" + u16("7,1\r\n")
                     + u16("2,1\r\n"))
    x, y, errors = read_all(path)
    assert len(errors) == 1 and errors[0].startswith(f"{path}:3: not valid utf-16 (byte 0x00")
    assert "UTF-16 byte-order mark" in errors[0]
    np.testing.assert_allclose(x[:, 0], [1, 2])
    assert y.tolist() == [0, 1]


def test_an_odd_first_jsonl_record_costs_its_own_row_only(tmp_path: Path) -> None:
    """A file's keys are those most of its first records share: a first record without
    a key, or with one more, refused every good record after it."""
    good = "".join(f'{{"a": {i}, "b": {i % 4}, "label": {i % 2}}}\n' for i in range(2, 22))
    for odd, why in (('{"a": 1, "label": 0}', "missing key 'b'"),
                     ('{"a": 1, "b": 1, "extra": 9, "label": 0}',
                      "unexpected key 'extra' (not in most of the first 16 records)")):
        path = tmp_path / "odd.jsonl"
        path.write_text(odd + "\n" + good)
        x, y, errors = read_all(path)
        assert len(errors) == 1 and errors[0].startswith(f"{path}:1: {why}"), errors
        assert x[:, 0].tolist() == list(range(2, 22)) and len(y) == 20


def test_a_csv_file_read_as_jsonl_costs_its_rows_with_one_hint(tmp_path: Path) -> None:
    # `--format jsonl` on a CSV file ended the feed with "cannot reshape array of size 0".
    path = tmp_path / "rows.csv"
    path.write_text("a,b,status\n1,2,0\n3,4,1\n")
    stream, name = open_input(str(path))
    with stream:
        chunks = list(Reader(stream, name, path=str(path), fmt="jsonl", label="status"))
    errors = [e for c in chunks for e in c.errors]
    assert sum(len(c.y) for c in chunks) == 0 and len(errors) == 3
    assert errors[0].startswith(f"{path}:1: invalid JSON")
    assert "--format jsonl: is it CSV?" in errors[0]
    assert all("is it CSV" not in e for e in errors[1:])


def test_labels_that_are_all_names_stop_the_input_once_with_the_classes_to_give(
    tmp_path: Path,
) -> None:
    path = tmp_path / "named.csv"
    path.write_text("temp,hum,state\n" + "1,2,ok\n3,4,alarm\n5,6,ok\n" * 100)
    with pytest.raises(DataError) as raised:
        read_all(path, label="state")
    said = str(raised.value)
    assert said.startswith(f"{path}: the labels in column 'state' are class names ('ok', "
                           "'alarm')")
    assert "--classes alarm,ok" in said
    # Indices with the odd name among them: that row alone is refused, as before.
    mixed = tmp_path / "mixed.csv"
    mixed.write_text("temp,state\n1,0\n2,oops\n3,1\n")
    _, y, errors = read_all(mixed, label="state")
    assert len(errors) == 1 and "label 'oops' is not an integer class index" in errors[0]
    np.testing.assert_array_equal(y, [0, 1])


def test_a_time_column_stops_the_input_once_with_the_columns_to_keep(tmp_path: Path) -> None:
    path = tmp_path / "timed.csv"
    path.write_text("timestamp,temp,hum,label\n"
                    + "".join(f"2024-05-01T10:{i:02d}:00,21.{i},40,{i % 2}\n" for i in range(50)))
    with pytest.raises(DataError) as raised:
        read_all(path)
    said = str(raised.value)
    assert said.startswith(f"{path}: column 'timestamp' holds date-times "
                           "('2024-05-01T10:00:00'), in every row so far")
    assert "--features temp,hum" in said
    # Once rows have gone through, a text value is that row's problem only.
    later = tmp_path / "later.csv"
    later.write_text("temp,label\n21,0\n22,1\nwarm,0\n23,1\n")
    x, _, errors = read_all(later)
    assert len(errors) == 1 and "'warm' is not a number" in errors[0]
    np.testing.assert_array_equal(x[:, 0], [21, 22, 23])


def test_a_few_odd_first_rows_are_their_own_problem(tmp_path: Path) -> None:
    # A live input's first chunk may be one row: one slip there must not stop the feed.
    path = tmp_path / "slips.csv"
    path.write_text("temp,label\n21,oops\nwarm,1\n" + "22,0\n23,1\n" * 5)
    _, y, errors = read_all(path, batch=1)
    assert len(errors) == 2 and len(y) == 10
    assert "label 'oops' is not an integer class index" in errors[0]
    assert "'warm' is not a number" in errors[1]


def test_a_second_byte_order_mark_is_not_part_of_the_header(tmp_path: Path) -> None:
    path = tmp_path / "two.csv"
    path.write_bytes("\ufeff".encode() * 2 + b'"a",label\n1,0\n2,1\n')
    stream, name = open_input(str(path))
    with stream:
        reader = Reader(stream, name, path=str(path), features=["a"])
        chunks = list(reader)
    assert reader.features == ["a"] and not chunks[0].errors
    assert chunks[0].x[:, 0].tolist() == [1, 2] and chunks[0].y.tolist() == [0, 1]
