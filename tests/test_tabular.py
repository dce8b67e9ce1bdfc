"""Tabular loading: real files with real quirks, and errors that point at file:line:column."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedstream.client.feed import Reader, open_input
from fedstream.client.sources import DataError, load_table, tabular


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def expect_error(path: Path, line: int, *fragments: str, **kw: object) -> str:
    """Load must fail with a message naming the file, the line and every fragment."""
    with pytest.raises(DataError) as info:
        load_table(path, **kw)  # type: ignore[arg-type]
    message = str(info.value)
    assert f"{path}:{line}:" in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# -------------------------------------------------------------------------------- csv


def test_quirky_csv_is_parsed(tmp_path: Path) -> None:
    text = (
        '\ufeff id ; "feat; one" ; f2 ; label ; ts \r\n'
        "\r\n"
        '1; "1.5" ; 2 ; cat ; 3\r\n'
        "2;2.5;-3e1;dog;1\r\n"
        "   \r\n"
        '3; 3.5 ;4; "cat" ;2\r\n'
    )
    table = load_table(write(tmp_path, "quirks.csv", text), label="label", time="ts")
    assert table.features == ["id", "feat; one", "f2"]
    assert table.classes == ["cat", "dog"]
    np.testing.assert_array_equal(table.time, [1.0, 2.0, 3.0])  # sorted by time
    np.testing.assert_array_equal(table.y, [1, 0, 0])
    np.testing.assert_array_equal(table.x, [[2, 2.5, -30], [3, 3.5, 4], [1, 1.5, 2]])
    assert table.x.dtype == np.float32 and table.y.dtype == np.int64
    assert len(table) == 3


@pytest.mark.parametrize("delimiter", [",", ";", "\t", "|"])
def test_delimiter_is_sniffed(tmp_path: Path, delimiter: str) -> None:
    rows = [["x1", "x2", "y"], ["1", "2", "a"], ["3", "4", "b"]]
    text = "\n".join(delimiter.join(r) for r in rows) + "\n"
    table = load_table(write(tmp_path, "d.csv", text), label="y")
    np.testing.assert_array_equal(table.x, [[1, 2], [3, 4]])


def test_decimal_commas_in_a_semicolon_file(tmp_path: Path) -> None:
    # A spreadsheet in a comma-decimal locale writes ';' between fields and ',' in numbers;
    # a point stays a decimal point there too (programs write such files with points),
    # one mark to a column.
    text = "\ufeffTemp;Druck;Zeit;Klasse\r\n19,87;1013;0.5;a\r\n-0,25;1,2e3;3.25;b\r\n,5;7;8;a\r\n"
    table = load_table(write(tmp_path, "de.csv", text), label="Klasse")
    np.testing.assert_allclose(
        table.x, [[19.87, 1013, 0.5], [-0.25, 1200, 3.25], [0.5, 7, 8]], rtol=1e-6
    )


@pytest.mark.parametrize(
    ("cell", "fragment"),
    [
        ("1.234,5", "'1.234,5' has thousands separators"),  # refused, and said why
        ("1,2,3", "'1,2,3' is not a number"),
        ("19,87x", "'19,87x' is not a number"),
    ],
)
def test_a_semicolon_file_refuses_what_is_no_number(
    tmp_path: Path, cell: str, fragment: str
) -> None:
    text = f"x;y;label\n1,5;2;a\n3;{cell};b\n"
    expect_error(write(tmp_path, "de.csv", text), 3, "column 'y'", fragment, label="label")


@pytest.mark.parametrize(
    ("text", "line", "fragments"),
    [
        # A German export: the point groups thousands. Read as 1.013 it would be 1000x off.
        ("Druck;Temp;y\n998;18,0;a\n1.013;20,5;b\n", 3,
         ["column 'Druck': '1.013' reads as 1.013 with a decimal point, but this file "
          "writes decimals with a comma ('18,0', line 2): if it means 1013"]),
        # Two exports pasted together: which mark is the decimal one?
        ("x;y\n1,5;a\n1.5;b\n2,000;a\n", 3,
         ["column 'x': '1.5' has a decimal point, but the column's first number with a "
          "mark, '1,5' (line 2), has a comma"]),
    ],
)
def test_a_number_that_reads_two_ways_in_a_semicolon_file_is_refused(
    tmp_path: Path, text: str, line: int, fragments: list[str]
) -> None:
    expect_error(write(tmp_path, "de.csv", text), line, *fragments, label="y")


@pytest.mark.parametrize("delimiter", ["\t", "|"])
def test_decimal_commas_elsewhere_are_refused_with_a_hint(tmp_path: Path, delimiter: str) -> None:
    # Only ';' files are read as comma-decimal: in others "1,234" may be a thousands
    # separator, and a silent 1000x error is worse than a refusal.
    text = delimiter.join(["x", "y", "label"]) + "\n" + delimiter.join(["1", "19,87", "a"]) + "\n"
    expect_error(
        write(tmp_path, "d.csv", text), 2, "'19,87' is not a number", "';' files only",
        label="label",
    )


def test_a_text_column_is_named_with_a_way_out(tmp_path: Path) -> None:
    path = write(tmp_path, "ids.csv", "station,temp,label\nA-1,20.5,ok\nB-2,21.0,bad\n")
    expect_error(path, 2, "column 'station': 'A-1' is not a number", "stream.exclude",
                 label="label")
    table = load_table(path, label="label", exclude=["station"])  # the way out works
    np.testing.assert_array_equal(table.x, [[20.5], [21.0]])
    assert table.features == ["temp"]
    np.testing.assert_array_equal(load_table(path, label="label", features=["temp"]).x, table.x)


def test_an_excluded_column_must_exist(tmp_path: Path) -> None:
    # A misspelt exclusion would leave the column it meant in, unnoticed until it fails.
    path = write(tmp_path, "ids.csv", "station,temp,label\nA-1,20.5,ok\nB-2,21.0,bad\n")
    expect_error(path, 1, "excluded column 'Station' not found; available: 'station'",
                 label="label", exclude=["Station"])
    with pytest.raises(ValueError, match="without features"):
        load_table(path, label="label", features=["temp"], exclude=["station"])


def test_a_jsonl_key_can_be_excluded(tmp_path: Path) -> None:
    text = '{"id": "a", "t": 1.5, "label": "x"}\n{"id": "b", "t": 2.5, "label": "y"}\n'
    path = write(tmp_path, "d.jsonl", text)
    table = load_table(path, label="label", exclude=["id"])
    assert table.features == ["t"]
    np.testing.assert_array_equal(table.x, [[1.5], [2.5]])
    expect_error(path, 1, "excluded key 'ID' not found in any record; did you mean 'id'?",
                 label="label", exclude=["ID"])
    # An optional key (in some records only) is what exclude is for: its absence from the
    # first record, or from any other, is no error.
    text = ('{"id": "a", "t": 1, "label": "x"}\n{"t": 2, "label": "y"}\n'
            '{"t": 3, "label": "x", "note": "n"}\n')
    path = write(tmp_path, "opt.jsonl", text)
    table = load_table(path, label="label", exclude=["id", "note"])
    assert table.features == ["t"] and table.x[:, 0].tolist() == [1, 2, 3]
    # Without the exclude: the problem nearest the top first, and where the next is.
    expect_error(path, 1, "key 'id': 'a' is not a number",
                 "(more problems below it: the next at line 2)", label="label")
    expect_error(path, 3, "unexpected key 'note' (not in the first record): to leave it out, "
                 """--set 'stream.exclude=["id", "note"]'""", label="label", exclude=["id"])


def test_selected_features_and_quoted_newline(tmp_path: Path) -> None:
    text = 'note,x1,x2,y\n"two\nlines",1,2,0\nplain,3,4,1\n'
    table = load_table(write(tmp_path, "n.csv", text), label="y", features=["x2", "x1"])
    assert table.features == ["x2", "x1"]
    np.testing.assert_array_equal(table.x, [[2, 1], [4, 3]])
    assert table.time is None


def test_time_sort_is_stable(tmp_path: Path) -> None:
    text = "t,x,y\n2,0,a\n1,1,a\n2,2,a\n1,3,a\n"
    table = load_table(write(tmp_path, "s.csv", text), label="y", time="t")
    np.testing.assert_array_equal(table.x[:, 0], [1, 3, 0, 2])


def test_iso_time_column(tmp_path: Path) -> None:
    text = "when,x,y\n2024-01-02T00:00:00Z,1,a\n2024-01-01 12:00:00,2,b\n"
    table = load_table(write(tmp_path, "iso.csv", text), label="y", time="when")
    np.testing.assert_array_equal(table.x[:, 0], [2, 1])
    assert table.time is not None and table.time[1] - table.time[0] == 12 * 3600


def test_integer_labels_sorted_numerically(tmp_path: Path) -> None:
    text = "x,y\n0,10\n1,2\n2,1\n3,02\n"
    table = load_table(write(tmp_path, "i.csv", text), label="y")
    assert table.classes == ["1", "2", "10"]
    np.testing.assert_array_equal(table.y, [2, 1, 0, 1])


def test_given_classes_fix_order_and_reject_unknown(tmp_path: Path) -> None:
    path = write(tmp_path, "c.csv", "x,y\n0,no\n1,yes\n\n2,maybe\n")
    table = load_table(path, label="y", classes=["yes", "no", "maybe"])
    assert table.classes == ["yes", "no", "maybe"]
    np.testing.assert_array_equal(table.y, [1, 0, 2])
    expect_error(path, 5, "column 'y'", "unknown label 'maybe'", label="y", classes=["yes", "no"])


@pytest.mark.parametrize("name", ["z.csv.gz", "Z.CSV.GZ", "z.csv"])
def test_gzip_csv_by_content_whatever_its_name(tmp_path: Path, name: str) -> None:
    # Known by its magic bytes: an upper-case suffix, or none, is not mistaken for UTF-16.
    path = write(tmp_path, name, gzip.compress(b"x,y\n1,a\n2,b\n"))
    np.testing.assert_array_equal(load_table(path, label="y").x[:, 0], [1, 2])
    stream, label = open_input(str(path))
    with stream:
        chunks = list(Reader(stream, label, path=str(path), label="y", classes=["a", "b"]))
    np.testing.assert_array_equal(np.concatenate([c.x for c in chunks])[:, 0], [1, 2])


def test_csv_missing_column_lists_available(tmp_path: Path) -> None:
    path = write(tmp_path, "m.csv", "\n\nx1,x2,y\n1,2,a\n")
    expect_error(path, 3, "'target'", "'x1', 'x2', 'y'", label="target")
    expect_error(path, 3, "feature column 'x9'", "'x1'", label="y", features=["x1", "x9"])
    expect_error(path, 3, "time column 'ts'", label="y", time="ts")


def test_csv_non_numeric_value(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.csv", "x1,x2,x3,y\n1,2,3,a\n\n4,5,abc,b\n")
    message = expect_error(path, 4, label="y")
    assert message.endswith("bad.csv:4: column 'x3': 'abc' is not a number")


@pytest.mark.parametrize("cell", ["", "NA", "nan", "  ", "NULL"])
def test_csv_missing_value(tmp_path: Path, cell: str) -> None:
    path = write(tmp_path, "gap.csv", f"x1,x2,y\r\n1,2,a\r\n3,{cell},b\r\n")
    expect_error(path, 3, "column 'x2'", "missing value", label="y")


def test_csv_missing_label_and_time(tmp_path: Path) -> None:
    path = write(tmp_path, "gap.csv", "x,y,t\n1,a,1\n2,b,NA\n3,,2\n")
    expect_error(path, 4, "column 'y'", "missing label", label="y", features=["x"])
    expect_error(path, 3, "column 't'", "missing", label="y", time="t")  # earliest line wins
    bad_time = write(tmp_path, "bt.csv", "x,y,t\n1,a,1\n2,b,soon\n")
    expect_error(bad_time, 3, "column 't'", "'soon' is not a number", label="y", time="t")
    mixed = write(tmp_path, "mt.csv", "x,y,t\n1,a,1704067200\n2,b,2024-01-01T00:01:00\n")
    expect_error(mixed, 3, "column 't': '2024-01-01T00:01:00' is an ISO-8601 date-time, where "
                 "line 2 has a number ('1704067200'): a time column takes one kind",
                 label="y", time="t")


def test_csv_ragged_row(tmp_path: Path) -> None:
    path = write(tmp_path, "rag.csv", 'x1,x2,y\n1,2,a\n"multi\nline",2,b\n3,4,c,extra\n')
    expect_error(path, 5, "expected 3 fields", "found 4", label="y", features=["x2"])


def test_csv_trailing_delimiter_tolerated(tmp_path: Path) -> None:
    path = write(tmp_path, "trail.csv", "x,y,\n1,a,\n2,b\n")
    table = load_table(path, label="y")
    assert table.features == ["x"]
    np.testing.assert_array_equal(table.x[:, 0], [1, 2])
    spill = write(tmp_path, "spill.csv", "x,y,\n1,a,\n2,b,7\n")
    expect_error(spill, 3, "expected 2 fields", label="y")


def test_csv_unterminated_quote(tmp_path: Path) -> None:
    path = write(tmp_path, "open.csv", 'x,y\n1,a\n2,"b\n3,c\n4,d\n')
    expect_error(path, 3, "unterminated quoted field", label="y")


def test_csv_line_numbers_count_quoted_newlines(tmp_path: Path) -> None:
    path = write(tmp_path, "q.csv", 'note,x,y\n"a\nb\nc",1,a\n\nok,oops,b\n')
    expect_error(path, 6, "column 'x'", "'oops' is not a number", label="y", features=["x"])


def test_empty_and_header_only(tmp_path: Path) -> None:
    empty = write(tmp_path, "empty.csv", "\ufeff\r\n\r\n")
    with pytest.raises(DataError, match=r"empty\.csv.*empty"):
        load_table(empty, label="y")
    header = write(tmp_path, "header.csv", "\n\nx,y\n\n")
    expect_error(header, 3, "no data rows", label="y")
    blank = write(tmp_path, "blank.jsonl", "\n \n")
    with pytest.raises(DataError, match=r"blank\.jsonl.*no records"):
        load_table(blank, label="y")


def test_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "latin.csv", b"x,y\n1,a\n2,caf\xe9\n")
    # The byte's value and where it is in its line, not an offset that reads like a value.
    expect_error(path, 3, "not valid UTF-8 (byte 0xe9 at byte 6 of the line)", label="y")


def test_a_file_with_two_byte_order_marks_reads_as_with_one(tmp_path: Path) -> None:
    """Two tools that each added a BOM: the second was part of the first column's name
    (quotes kept), so no stream.time or stream.label could name it."""
    bom = "\ufeff".encode()
    for name, data in (("two.csv", bom * 2 + b'"Date",x,label\n1,2,0\n3,4,1\n'),
                       ("u16.csv", '\ufeff"Date",x,label\n1,2,0\n3,4,1\n'.encode("utf-16"))):
        table = load_table(write(tmp_path, name, data), label="label", time="Date")
        assert table.features == ["x"], name


# ------------------------------------------------------------------------------ jsonl


def test_jsonl_is_parsed(tmp_path: Path) -> None:
    text = (
        '{"b": 1, "a": 2.5, "label": 1, "t": 5}\r\n'
        "\n"
        '{"a": -1, "b": 1e3, "label": 0, "t": 4}\n'
        '{"a": 0, "b": 2, "label": 10, "t": 6}\n'
    )
    table = load_table(write(tmp_path, "ok.jsonl", text), label="label", time="t")
    assert table.features == ["b", "a"]  # order of the first object
    assert table.classes == ["0", "1", "10"]
    np.testing.assert_array_equal(table.x, [[1000, -1], [1, 2.5], [2, 0]])
    np.testing.assert_array_equal(table.y, [0, 1, 2])
    np.testing.assert_array_equal(table.time, [4, 5, 6])


def test_format_detected_from_content(tmp_path: Path) -> None:
    path = write(tmp_path, "records.data", '{"x": 1, "y": "a"}\n')
    assert load_table(path, label="y").features == ["x"]
    forced = write(tmp_path, "records.jsonl", "x,y\n1,a\n")
    assert load_table(forced, label="y", fmt="csv").features == ["x"]


def test_jsonl_key_twice_in_one_record(tmp_path: Path) -> None:
    twice = write(tmp_path, "dup.jsonl", '{"x": 1, "y": "a"}\n{"x": 1, "x": 2, "y": "b"}\n')
    expect_error(twice, 2, "key 'x' appears twice in one record", label="y")


def test_json_lines_read_as_csv_get_a_hint(tmp_path: Path) -> None:
    path = write(tmp_path, "j.csv", '{"x": 1, "y": "a"}\n')
    expect_error(path, 1, "label column 'y' not found", "the file looks like JSON Lines",
                 label="y", fmt="csv")


def test_jsonl_invalid_json(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.jsonl", '{"x": 1, "y": "a"}\n\n{"x": 2, "y": }\n')
    expect_error(path, 3, "invalid JSON", label="y")
    not_object = write(tmp_path, "arr.jsonl", '{"x": 1, "y": "a"}\n[1, 2]\n')
    expect_error(not_object, 2, "expected a JSON object", label="y")


def test_jsonl_missing_key(tmp_path: Path) -> None:
    path = write(tmp_path, "mk.jsonl", '{"x": 1, "z": 0, "y": "a"}\n{"x": 2, "y": "b"}\n')
    expect_error(path, 2, "missing key 'z' (the first record has it", "'x', 'y'", label="y")
    expect_error(path, 1, "missing key 'w'", label="y", features=["x", "w"])
    expect_error(path, 1, "missing key 'ts'", label="y", time="ts")


def test_whole_number_labels_with_a_decimal_comma_are_one_class(tmp_path: Path) -> None:
    path = write(tmp_path, "dc.csv", "a;label\n1,5;1,0\n2;1\n3;2,00\n4;2\n5;1,5\n")
    table = load_table(path, label="label")
    assert table.classes == ["1", "1,5", "2"] and table.y.tolist() == [0, 0, 2, 2, 1]
    path = write(tmp_path, "pt.csv", 'a,label\n1,"3,000"\n2,3\n')  # there a thousand
    assert load_table(path, label="label").classes == ["3", "3,000"]


def test_a_spreadsheet_workbook_is_named_as_one(tmp_path: Path) -> None:
    import zipfile

    with zipfile.ZipFile(tmp_path / "b.xlsx", "w") as book:
        book.writestr("xl/workbook.xml", "<workbook/>" * 50)
    expect_error(tmp_path / "b.xlsx", 1, "probably a spreadsheet workbook (.xlsx, .ods): "
                 "export the sheet as CSV", label="label")
    path = write(tmp_path, "old.xls", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(range(256)))
    expect_error(path, 1, "an Excel 97-2003 workbook (.xls)", label="label")


def test_rows_of_empty_cells_are_skipped_like_empty_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "x.csv", "a,b,label\r\n1,2,p\r\n,,\r\n3,4,q\r\n , ,\r\n,,\r\n")
    table = load_table(path, label="label")
    assert table.x.tolist() == [[1, 2], [3, 4]] and table.classes == ["p", "q"]
    expect_error(write(tmp_path, "y.csv", "a,b,label\n1,2,p\n,,q\n"), 3,
                 "missing value", label="label")  # a row with a label is not empty


def test_numbers_only_python_reads_are_refused(tmp_path: Path) -> None:
    """float() takes '1_000' and Arabic-Indic digits; a spreadsheet writes neither, and a
    text cell read as 1000 would be a silent feature. No-break spaces around a number pad it."""
    path = write(tmp_path, "u.csv", "a,b,label\n0.5,1,p\n1_000,2,q\n")
    expect_error(path, 3, "column 'a': '1_000' is not a number: write it without the '_'",
                 label="label")
    path = write(tmp_path, "ar.csv", "a,b,label\n0.5,1,p\n\u0661\u0662,2,q\n")
    expect_error(path, 3, "is not a number: write its digits as 0-9", label="label")
    path = write(tmp_path, "nb.csv", "a;b;label\n\u00a00,5\u00a0;1;p\n2;2;q\n")
    assert load_table(path, label="label").x[:, 0].tolist() == [0.5, 2.0]


def test_a_jsonl_files_problems_come_in_file_order(tmp_path: Path) -> None:
    # A trial's file: a null at line 5, a missing key at 7, an extra key at 9. They came
    # one a run, and not in file order (the missing key first).
    records = [{"a": i, "b": i % 3, "label": i % 2} for i in range(12)]
    records[4]["b"] = None
    del records[6]["b"]
    records[8]["extra"] = 1
    path = write(tmp_path, "p.jsonl", "\n".join(json.dumps(r) for r in records) + "\n")
    message = expect_error(path, 5, "key 'b': missing value (null)", label="label")
    assert message.endswith("(more problems below it: the next at line 7)")
    del records[4]["b"]  # now a missing key comes first, then the extra one
    path = write(tmp_path, "q.jsonl", "\n".join(json.dumps(r) for r in records) + "\n")
    message = expect_error(path, 5, "missing key 'b' (the first record has it", label="label")
    assert message.endswith("(more problems below it: the next at line 7)")


def test_jsonl_extra_key_when_features_inferred(tmp_path: Path) -> None:
    path = write(tmp_path, "ek.jsonl", '{"x": 1, "y": "a"}\n{"x": 2, "y": "b", "q": 3}\n')
    expect_error(path, 2, "unexpected key 'q'", label="y")
    assert load_table(path, label="y", features=["x"]).x.shape == (2, 1)


@pytest.mark.parametrize(
    "value, fragment",
    [
        ('"1.5"', "'1.5' is not a number"),
        ("null", "missing value"),
        ("NaN", "missing value"),
        ("[1]", "is not a number"),
        ("Infinity", "not a finite"),
    ],
)
def test_jsonl_bad_values(tmp_path: Path, value: str, fragment: str) -> None:
    path = write(tmp_path, "v.jsonl", f'{{"x": 1, "y": "a"}}\n\n\n{{"x": {value}, "y": "b"}}\n')
    expect_error(path, 4, "key 'x'", fragment, label="y")


def test_jsonl_missing_label(tmp_path: Path) -> None:
    path = write(tmp_path, "ml.jsonl", '{"x": 1, "y": "a"}\n{"x": 2, "y": null}\n')
    expect_error(path, 2, "key 'y'", "missing value", label="y")
    blank = write(tmp_path, "bl.jsonl", '{"x": 1, "y": "a"}\n{"x": 2, "y": " "}\n')
    expect_error(blank, 2, "key 'y'", "missing label", label="y")


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="label"):
        load_table("unused.csv", label="y", features=["x", "y"])
    with pytest.raises(ValueError, match="fmt"):
        load_table("unused.csv", label="y", fmt="xlsx")  # type: ignore[arg-type]
    with pytest.raises(DataError, match=r"nowhere\.csv"):
        load_table("nowhere.csv", label="y")


# ------------------------------------------------------------ exports from other tools


def test_integer_labels_written_as_floats_are_one_class(tmp_path: Path) -> None:
    # Two exports concatenated: one wrote the label column as integers, one as floats.
    path = write(tmp_path, "mixed.csv", "a,label\n1,0\n2,1\n3,1.0\n4,0.0\n5,2.00\n")
    table = load_table(path, label="label")
    assert table.classes == ["0", "1", "2"]
    np.testing.assert_array_equal(table.y, [0, 1, 1, 0, 2])
    # numpy's savetxt writes every value in exponent form: the same classes. A code in
    # exponent form without a signed exponent ("1E3", a part number) stays a name.
    rows = np.array([[1.5, 0], [2.5, 1], [3.5, 1], [4.5, 2]])
    np.savetxt(tmp_path / "saved.csv", rows, delimiter=",", header="a,label", comments="")
    saved = load_table(tmp_path / "saved.csv", label="label", classes=["0", "1", "2"])
    assert saved.classes == ["0", "1", "2"] and saved.y.tolist() == [0, 1, 1, 2]
    codes = load_table(write(tmp_path, "codes.csv", "a,label\n1,1E3\n2,1000\n3,2.5e+01\n"),
                       label="label")
    assert codes.classes == ["25", "1000", "1E3"]


def test_numbers_with_fractions_among_label_names_are_refused_as_misaligned_rows(
    tmp_path: Path,
) -> None:
    """Two exports with different column orders joined whole: another column's
    measurements under the label, each a class of its own, silently."""
    rows = [f"x,{i},normal" for i in range(20)] + [f"y,{i},{i * 0.37 + 0.01:.3f}"
                                                   for i in range(20)]
    path = write(tmp_path, "joined.csv", "site,a,status\n" + "\n".join(rows) + "\n")
    message = expect_error(path, 22, "column 'status': '0.010' is a number with a fraction",
                           label="status", exclude=["site"])
    assert "('normal'); 20 rows' labels are such numbers" in message
    assert "may not line up with the header" in message and "in stream.classes" in message
    # Version-like classes among names, integers with names, or numbers alone pass.
    for labels in (["legacy", "1.2", "1.3", "2.1"] * 3, ["ok", "1", "2"] * 3,
                   ["0.5", "1.5", "2.5"] * 3):
        ok = write(tmp_path, "ok.csv", "a,label\n" + "".join(f"{i},{v}\n"
                                                              for i, v in enumerate(labels)))
        assert len(load_table(ok, label="label").classes) == len(set(labels))


def test_excel_sep_line_names_the_delimiter(tmp_path: Path) -> None:
    path = write(tmp_path, "excel.csv", "sep=;\r\nTemp;Status\r\n19,5;ok\r\nx;bad\r\n")
    message = expect_error(path, 4, "column 'Temp'", label="Status")
    assert "'x' is not a number" in message  # line numbers still count the sep= line
    path = write(tmp_path, "excel.csv", '"sep=;"\r\nTemp;Status\r\n19,5;ok\r\n20;bad\r\n')
    table = load_table(path, label="Status")
    np.testing.assert_allclose(table.x[:, 0], [19.5, 20.0])


def test_an_unterminated_quote_mid_file_is_named_at_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "u.csv", 'a,b,label\n1,2,0\n"3,4,1\n5,6,0\n7,8,1\n')
    expect_error(path, 3, "unterminated quoted field", label="label")


def test_a_quote_closed_lines_later_is_refused_not_read_into_a_new_class(tmp_path: Path) -> None:
    # The quote opened on line 3 closes on line 4: one record, as many fields as a row, and a
    # label "b;5;6\n7;8;c" that would have been a new class, the row between lost.
    path = write(tmp_path, "m.csv", 'a;b;label\n1;2;a\n3;4;"b;5;6\n7;8;c"\n9;10;a\n')
    expect_error(path, 3, "column 'label'", "unterminated quoted field", label="label")
    feature = write(tmp_path, "f.csv", 'a,b,label\n1,"2\n3",a\n4,5,b\n')
    expect_error(feature, 2, "column 'b'", "unterminated quoted field", label="label")


def test_text_in_a_feature_column_says_what_to_do(tmp_path: Path) -> None:
    joined = write(tmp_path, "joined.csv", "x,y\n1,a\n2,b\nx,y\n3,a\n")  # cat a.csv b.csv
    expect_error(joined, 4, "column 'x': 'x' is not a number; this row repeats the header",
                 label="y")
    # With many columns, one line says it: not one per column that the header row fills.
    wide = ",".join(f"c{j}" for j in range(20))
    body = "".join(",".join(str(j) for j in range(20)) + f",{k % 2}\n" for k in range(4))
    cat = write(tmp_path, "wide.csv", f"{wide},y\n{body}{wide},y\n{body}")
    message = expect_error(cat, 6, "column 'c0': 'c0' is not a number; this row repeats the "
                           "header (files joined whole?): keep one header row", label="y")
    assert "\n" not in message
    timed = write(tmp_path, "t.csv", "when,x,y\n2024-03-01T00:00:00,1,a\n2024-03-01 01:00,2,b\n")
    expect_error(timed, 2, "a time column? name it: stream.time = \"when\"", label="y")
    missing = write(tmp_path, "na.csv", "x,y\n1,a\nNA,b\n")
    expect_error(missing, 3, "missing value 'NA'; values are not imputed: drop or fill that row",
                 label="y")


def test_utf16_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    # Excel's "Unicode text" export: UTF-16LE with a BOM, tab-separated.
    text = "Temperatur °C\tKlasse\r\n19.5\tja\r\n20\tnein\r\n"
    table = load_table(write(tmp_path, "u16.txt", text.encode("utf-16")), label="Klasse")
    assert table.features == ["Temperatur °C"]
    np.testing.assert_allclose(table.x[:, 0], [19.5, 20.0])


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ("Temperatur °C,label\n1,0\n".encode("cp1252"), "Windows-1252"),
        ("a,label\n1,0\n".encode("utf-16-le"), "UTF-16 without a byte-order mark"),
    ],
)
def test_a_file_in_another_encoding_gets_a_hint(tmp_path: Path, data: bytes, fragment: str) -> None:
    message = expect_error(write(tmp_path, "enc.csv", data), 1, label="label")
    assert fragment in message and "UTF-8" in message


def test_a_stray_nul_byte_is_no_utf16_and_arrays_and_headerless_files_are_named(
    tmp_path: Path,
) -> None:
    nul = write(tmp_path, "nul.csv", b"a,label\n" + b"1,0\n" * 5 + b"2,\x001\n" + b"1,0\n" * 9)
    message = expect_error(nul, 7, "stray NUL bytes: it is damaged, or not a text file",
                           label="label")
    assert "UTF-16" not in message
    for text in ('[{"a": 1, "label": 0}]\n', '[\n{"a": 1, "label": 0}\n]\n'):
        expect_error(write(tmp_path, "arr.json", text), 1, "a JSON array of records is not "
                     "JSON Lines", label="label", fmt="jsonl")
    expect_error(write(tmp_path, "nohead.csv", "0.5,1.2,cold\n0.7,1.1,warm\n"), 1,
                 "the first row looks like data, not a header", label="label")


def test_numbers_written_with_a_decimal_comma_are_not_advised_away(tmp_path: Path) -> None:
    rows = "".join(f'"0,{i}4",{i},x{i % 2}\n' for i in range(40))
    message = expect_error(write(tmp_path, "comma.csv", "a,b,label\n" + rows), 2,
                           "write them plainly (1013.33)", label="label")
    assert "stream.exclude" not in message


def test_a_text_column_with_one_number_in_it_is_still_advised_out(tmp_path: Path) -> None:
    words = ["red", "blue", "green"]
    rows = '"3,5",1,x0\n' + "".join(f"{words[i % 3]},{i},x{i % 2}\n" for i in range(40))
    message = expect_error(write(tmp_path, "words.csv", "a,b,label\n" + rows), 2,
                           "no feature: leave it out", label="label")
    assert "decimal comma" not in message.split("\n", 1)[1]
    # Column names that are numbers (pandas' 0, 1, 2) are a header all the same.
    expect_error(write(tmp_path, "idx.csv", "0,1,2\n5,6,x\n"), 1, label="label")
    assert "looks like data" not in expect_error(
        write(tmp_path, "idx.csv", "0,1,2\n5,6,x\n"), 1, label="label")


def test_a_huge_number_is_refused_without_a_numpy_warning(tmp_path: Path) -> None:
    import warnings

    path = write(tmp_path, "big.csv", "a,label\n1,0\n1e39,1\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        expect_error(path, 3, "'1e39' is not a finite float32 number", label="label")


def test_features_converted_block_by_block_are_the_file_and_errors_keep_their_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedstream.client.sources import tabular

    monkeypatch.setattr(tabular._Cells, "BLOCK", 2)  # blocks of 2 rows: 3 blocks below
    text = "a,b,label\r1,2,0\r3,4,1\r5,6,0\r7,8,1\r9,10,0\r"  # CR-only line ends
    table = load_table(write(tmp_path, "cr.csv", text), label="label")
    np.testing.assert_array_equal(table.x, [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]])
    bad = "a,b,label\n1,2,0\n3,4,1\n5,x,0\n7,8,1\n9,NA,0\n"
    message = expect_error(write(tmp_path, "bad.csv", bad), 4, "column 'b'", label="label")
    assert "'x' is not a number" in message and "stream.exclude" not in message
    early_label = "a,b,label\n1,2,0\n3,4,NA\n5,x,0\n"  # a label error above the cell error
    expect_error(write(tmp_path, "lab.csv", early_label), 3, "missing label", label="label")


def test_a_time_column_reads_a_decimal_comma_in_a_semicolon_file(tmp_path: Path) -> None:
    table = load_table(write(tmp_path, "t.csv", "ts;a;y\n5,6;1;x\n2,5;2;y\n"), label="y",
                       time="ts")
    np.testing.assert_allclose(table.time, [2.5, 5.6])


def test_a_group_column_says_where_each_row_came_from(tmp_path: Path) -> None:
    # A site column is not a feature: it is kept as codes into its sorted values, and
    # follows the rows when a time column reorders them.
    text = "site,t,a,y\nrome,3,1,x\nparis,1,2,y\nrome,2,3,x\n"
    table = load_table(write(tmp_path, "s.csv", text), label="y", time="t", group="site")
    assert table.features == ["a"] and table.group_names == ["paris", "rome"]
    np.testing.assert_array_equal(table.x[:, 0], [2, 3, 1])
    np.testing.assert_array_equal(table.groups, [0, 1, 1])
    jsonl = '{"site": 7, "a": 1, "y": "x"}\n{"site": 3, "a": 2, "y": "y"}\n'
    table = load_table(write(tmp_path, "s.jsonl", jsonl), label="y", group="site")
    assert table.group_names == ["3", "7"] and table.groups.tolist() == [1, 0]
    missing = write(tmp_path, "m.csv", "site,a,y\nrome,1,x\n,2,y\n")
    expect_error(missing, 3, "column 'site': missing value ''", label="y", group="site")
    with pytest.raises(ValueError, match="group column 'a' must not also be listed"):
        load_table(missing, label="y", features=["a"], group="a")


def test_a_misspelt_column_gets_a_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "s.csv", "Site,temp,label\nrome,1,x\n")
    expect_error(path, 1, "group (partition.column) column 'site' not found",
                 "did you mean 'Site'?",
                 label="label", group="site")
    expect_error(path, 1, "label column 'lable' not found", "did you mean 'label'?", label="lable")
    jsonl = write(tmp_path, "s.jsonl", '{"Site": "rome", "temp": 1, "label": "x"}\n')
    message = expect_error(jsonl, 1, "missing key 'site'", "did you mean 'Site'?", label="label",
                           group="site")
    assert "the first record has it" not in message  # it is the first record, and has not


def test_a_file_stream_gives_what_it_has_as_a_slice_would(tmp_path: Path) -> None:
    # The README's `stream.take(0, 100)` raised a bare IndexError on a client of 45 rows.
    from fedstream.protocol.config import load
    from fedstream.sim.federation import federation

    path = tmp_path / "small.csv"
    path.write_text("a,label\n" + "".join(f"{i},{i % 2}\n" for i in range(90)))
    cfg = load(None, ["stream.source=csv", f'stream.path="{path}"', "federation.clients=2",
                      'partition.scheme="iid"'])
    stream = federation(cfg).stream(0)
    n = stream.source.length
    assert n is not None and n < 100
    assert len(stream.take(0, 100)) == n and len(stream.take(n + 5, n + 10)) == 0


def test_every_unreadable_feature_column_is_said_at_once_with_what_to_do(tmp_path: Path) -> None:
    rows = ["device_id,site,temp,humidity %,comment,label"]
    for i in range(40):
        hum = "" if i % 7 == 3 else "40.5"
        rows.append(f"A-{i % 4},north,21.5,{hum},{'fan noisy' if i == 10 else ''},ok")
    path = write(tmp_path, "s.csv", "\n".join(rows) + "\n")
    message = expect_error(path, 2, "column 'device_id': 'A-0' is not a number", label="label")
    lines = message.splitlines()
    assert "all the feature columns with such cells, in lines 2 to 41:" in lines[1]
    assert lines[2].strip() == ("column 'device_id': 40 not numbers (e.g. 'A-0') of 40 rows, "
                                "first at line 2; no feature: leave it out (stream.exclude)")
    assert lines[4].strip() == ("column 'humidity %': 6 missing of 40 rows, first at line 5; "
                                "drop or fix those rows (values are not imputed)")
    assert lines[5].strip().startswith("column 'comment': 39 missing, 1 not numbers "
                                       "(e.g. 'fan noisy') of 40 rows")
    assert lines[-1].strip() == (
        """to leave those out: --set 'stream.exclude=["device_id", "site", "comment"]'""")
    assert "temp" not in message  # a column that reads is not listed
    # Columns already left out stay in the suggestion: run after run, it only grows.
    again = expect_error(path, 2, "column 'site'", label="label", exclude=["device_id"])
    assert again.splitlines()[-1].strip() == (
        """to leave those out: --set 'stream.exclude=["device_id", "site", "comment"]'""")
    # One bad cell in one column: the first line says it all, no report.
    one = write(tmp_path, "one.csv", "temp,label\n21,ok\nwarm,ok\n22,ok\n")
    assert "\n" not in expect_error(one, 3, "'warm' is not a number", label="label")


def test_a_label_column_left_at_its_default_says_which_key_names_it(tmp_path: Path) -> None:
    path = write(tmp_path, "d.csv", "temp,state\n1,ok\n2,alarm\n")
    expect_error(path, 1, "label column 'label' not found; available: 'temp', 'state'",
                 "name the column of classes: stream.label (fedstream feed: --label)",
                 label="label")


def test_true_and_false_are_one_and_zero_in_csv_and_jsonl(tmp_path: Path) -> None:
    """Exports write booleans as True/False (pandas), TRUE/FALSE (spreadsheets) or JSON's
    true/false: a feature column of them is 1 and 0, not a column to leave out."""
    csv = write(tmp_path, "b.csv", "x,weekend,y\n1.5,True,a\n2,FALSE,b\n3, true ,a\n4,0,b\n")
    assert load_table(csv, label="y").x[:, 1].tolist() == [1.0, 0.0, 1.0, 0.0]
    jsonl = write(tmp_path, "b.jsonl",
                  '{"x": 1, "w": true, "y": "a"}\n{"x": 2.5, "w": false, "y": "b"}\n')
    assert load_table(jsonl, label="y").x.tolist() == [[1.0, 1.0], [2.5, 0.0]]
    # Anything else in such a column is still named, as in any other.
    bad = write(tmp_path, "c.csv", "x,weekend,y\n1,True,a\n2,yes,b\n")
    expect_error(bad, 3, "column 'weekend': 'yes' is not a number", label="y")


# ------------------------------------------------------------ the two CSV readers agree

_GOOD_CELLS = st.one_of(
    st.floats(-1e6, 1e6, allow_nan=False, width=32).map(repr),
    st.integers(-10**6, 10**6).map(str),
    st.sampled_from([" 1.5", "2 ", "1e3", "+4", "-.5", "7.", "0"]),
)
_ODD_CELLS = st.sampled_from(["1_0", "true", "", "NA", "x", "1e99", "nan", "inf", "١٢",
                              "\xa03", "1\u3000", "2\x1c", "1\x85", "\x0b4"])
# Mostly numbers, so that many files are clean and take the fast path whole.
_CELLS = st.integers(0, 39).flatmap(lambda k: _ODD_CELLS if k == 0 else _GOOD_CELLS)
_LABELS = st.sampled_from(["0", "1", "007", "7", "7.0", "UP", "DOWN", " up ", "0", "1", "",
                           "?"])


@given(
    rows=st.lists(st.tuples(st.lists(_CELLS, min_size=2, max_size=2), _LABELS,
                            st.sampled_from(["", "   ", None, None, "EMPTY CELLS"]),
                            st.sampled_from([0] * 12 + [-1, 1])),
                  min_size=1, max_size=12),
    delimiter=st.sampled_from([",", "\t", "|"]),
    end=st.sampled_from(["\n", "\r\n"]),
    final=st.booleans(),
    times=st.none() | st.lists(_CELLS, min_size=12, max_size=12),
    block=st.sampled_from([1, 9, 40, 1 << 23]),  # characters a block of the fast reader takes
)
@settings(max_examples=150, deadline=None)
def test_the_fast_and_the_careful_csv_reader_agree(
    tmp_path_factory: pytest.TempPathFactory, rows: list, delimiter: str, end: str,
    final: bool, times: list[str] | None, block: int,
) -> None:
    """A file without quotes is read by numpy's C parser, and falls back to the careful
    row-by-row reader for anything it cannot take: both must give the same table, or
    the same error at the same line. A quoted header name sends the careful reader."""
    lines = []
    for i, (cells, label, blank, ragged) in enumerate(rows):
        if blank is not None:  # a blank line, one of spaces, or of empty cells, between rows
            lines.append(delimiter * (2 + (times is not None)) if blank == "EMPTY CELLS" else blank)
        stamp = [] if times is None else [times[i]]
        fields = [*cells, *stamp, label] + (["9"] if ragged > 0 else [])
        lines.append(delimiter.join(fields[: len(fields) - (ragged < 0)]))
    body = end.join(lines) + (end if final else "")
    folder = tmp_path_factory.mktemp("readers")
    header = ["a", "b", *([] if times is None else ["t"]), "label"]
    plain = write(folder, "plain.csv", delimiter.join(header) + end + body)
    quoted = write(folder, "quoted.csv", delimiter.join(['"a"', *header[1:]]) + end + body)
    outcomes, fast = [], []
    real = tabular._plain_rows

    def spied(*args: object) -> object:
        table = real(*args)  # type: ignore[arg-type]
        fast.append(table is not None)
        return table

    for path in (plain, quoted):
        tabular._PLAIN_BLOCK, default = block, tabular._PLAIN_BLOCK
        tabular._plain_rows = spied  # type: ignore[assignment]
        try:
            table = load_table(path, label="label", time=None if times is None else "t")
        except DataError as exc:
            outcomes.append(("error", str(exc).replace(str(path), "FILE")))
        else:
            stamps = None if table.time is None else table.time.tolist()
            outcomes.append((table.x.tobytes(), table.x.shape, table.y.tolist(), table.classes,
                             table.features, stamps))
        finally:
            tabular._PLAIN_BLOCK, tabular._plain_rows = default, real  # type: ignore[assignment]
    assert outcomes[0] == outcomes[1]
    # A clean file must have taken the fast reader (a broken one would fall back unseen):
    # plain ASCII numbers, no true/false (which only the careful reader turns into 1/0).
    cells = [c for cells, *_ in rows for c in cells] + (times or [])[: len(rows)]
    plain_numbers = all(c.isascii() and c.isprintable() and c.strip().lower() not in
                        ("true", "false") for c in cells)
    if outcomes[0][0] != "error" and plain_numbers:
        assert fast == [True], body
