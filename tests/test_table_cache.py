"""The on-disk cache of parsed data files (sim/table_cache.py): real files, real folders."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from fedstream.client.sources import DataError, tabular
from fedstream.sim import table_cache
from fedstream.sim.table_cache import cached_table


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(table_cache.ENV, str(root))
    return root


def _csv(path: Path, rows: int = 50, shift: float = 0.0) -> Path:
    lines = ["a,b,label"] + [f"{i * 0.5 + shift},{-i},{'xy'[i % 2]}" for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every real parse of a file."""
    calls: list[str] = []
    real = table_cache.load_table

    def counting(path: Path, **kwargs: object) -> tabular.Table:
        calls.append(str(path))
        return real(path, **kwargs)

    monkeypatch.setattr(table_cache, "load_table", counting)
    return calls


def test_a_file_is_parsed_once_then_mapped(cache: Path, tmp_path: Path, monkeypatch) -> None:
    data = _csv(tmp_path / "d.csv")
    parses = _parses(monkeypatch)
    first = cached_table(data, label="label")
    second = cached_table(data, label="label")
    assert parses == [str(data)]
    assert isinstance(second.x, np.memmap)
    np.testing.assert_array_equal(first.x, second.x)
    np.testing.assert_array_equal(first.y, second.y)
    assert (second.classes, second.features) == (["x", "y"], ["a", "b"])
    # Copy-on-write: a process that scales its arrays in place never touches the entry.
    second.x[:] = 0
    np.testing.assert_array_equal(cached_table(data, label="label").x, first.x)


def test_a_large_file_is_said_to_be_read_once(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = _csv(tmp_path / "d.csv")
    monkeypatch.setattr(table_cache, "SAY_READING", data.stat().st_size)  # "large" here
    cached_table(data, label="label")
    said = capsys.readouterr().err
    assert said == (f"fedstream: reading {data} ({data.stat().st_size / 1e6:.0f} MB); later "
                    "runs take it from the cache\n")
    cached_table(data, label="label")  # from the cache: nothing to say
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(table_cache, "SAY_READING", data.stat().st_size + 1)
    cached_table(data, label="label", exclude=["b"])  # a parse, of a file below the size
    assert capsys.readouterr().err == ""


def test_a_cached_table_keeps_its_time_column(cache: Path, tmp_path: Path) -> None:
    # stream.arrival = 'time' replays the rows at these times, in every Ray worker.
    data = tmp_path / "t.csv"
    data.write_text("t,a,label\n" + "".join(f"{9 - i},{i},{i % 2}\n" for i in range(10)))
    first = cached_table(data, label="label", time="t")
    second = cached_table(data, label="label", time="t")
    assert isinstance(second.x, np.memmap) and second.time is not None
    assert second.time.tolist() == first.time.tolist() == list(range(10))  # sorted by time
    assert cached_table(data, label="label").time is None


def test_a_changed_file_or_other_columns_are_parsed_again(
    cache: Path, tmp_path: Path, monkeypatch
) -> None:
    data = _csv(tmp_path / "d.csv")
    parses = _parses(monkeypatch)
    cached_table(data, label="label")
    cached_table(data, label="label", features=["a"])
    assert cached_table(data, label="label", exclude=["b"]).features == ["a"]
    assert len(parses) == 3
    _csv(data, shift=1.0)
    os.utime(data, ns=(1, 1))  # a different modification time, whatever the clock
    changed = cached_table(data, label="label")
    assert len(parses) == 4 and changed.x[0, 0] == 1.0


def test_an_edit_that_keeps_size_and_time_is_still_seen(
    cache: Path, tmp_path: Path, monkeypatch
) -> None:
    # cp -p, tar, touch -r, or a coarse clock can keep both; the content decides.
    data = _csv(tmp_path / "d.csv")
    before = data.stat()
    cached_table(data, label="label")
    data.write_text(data.read_text().replace("0.0,0,x", "9.0,0,x", 1))
    os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert data.stat().st_size == before.st_size
    assert cached_table(data, label="label").x[0, 0] == 9.0


def test_an_interrupted_write_leaves_nothing_behind(
    cache: Path, tmp_path: Path, monkeypatch
) -> None:
    data = _csv(tmp_path / "d.csv")
    real_save = np.save

    def interrupted(path: Path, arr: np.ndarray) -> None:
        real_save(path, arr)
        raise KeyboardInterrupt

    monkeypatch.setattr(table_cache.np, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cached_table(data, label="label")
    assert list(cache.iterdir()) == []


def test_a_killed_writers_staging_folder_is_removed_later(cache: Path, tmp_path: Path) -> None:
    cache.mkdir()
    left = cache / f"{table_cache.STAGING}abc-123"
    left.mkdir()
    (left / "x.npy").write_bytes(b"half")
    os.utime(left, (1.0, 1.0))  # long ago
    fresh = cache / f"{table_cache.STAGING}def-456"  # another process writing right now
    fresh.mkdir()
    cached_table(_csv(tmp_path / "d.csv"), label="label")
    assert not left.exists() and fresh.exists()


def test_an_entry_with_labels_out_of_range_is_not_trusted(
    cache: Path, tmp_path: Path, monkeypatch
) -> None:
    data = _csv(tmp_path / "d.csv")
    cached_table(data, label="label")
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    np.save(entry / "y.npy", np.full(50, 7))
    parses = _parses(monkeypatch)
    assert cached_table(data, label="label").y.max() == 1 and len(parses) == 1


def test_entries_are_readable_by_other_users_of_a_shared_cache(
    cache: Path, tmp_path: Path
) -> None:
    cached_table(_csv(tmp_path / "d.csv"), label="label")
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    assert entry.stat().st_mode & 0o055 == 0o055


@pytest.mark.parametrize("value", ["off", "OFF", "", "0", "false", "no"])
def test_switched_off_it_writes_nothing(tmp_path: Path, monkeypatch, value: str) -> None:
    monkeypatch.setenv(table_cache.ENV, value)
    data = _csv(tmp_path / "d.csv")
    parses = _parses(monkeypatch)
    cached_table(data, label="label")
    cached_table(data, label="label")
    assert len(parses) == 2
    assert table_cache.cache_dir() is None


def test_an_unwritable_cache_only_costs_the_parse(tmp_path: Path, monkeypatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(table_cache.ENV, str(blocker / "tables"))
    data = _csv(tmp_path / "d.csv")
    assert len(cached_table(data, label="label")) == 50


def test_a_damaged_entry_is_parsed_and_rewritten(cache: Path, tmp_path: Path, monkeypatch) -> None:
    data = _csv(tmp_path / "d.csv")
    cached_table(data, label="label")
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    (entry / "x.npy").write_bytes(b"\x93NUMPY truncated")
    parses = _parses(monkeypatch)
    table = cached_table(data, label="label")
    assert len(parses) == 1 and table.x.shape == (50, 2)
    assert len(cached_table(data, label="label")) == 50 and len(parses) == 1


def test_a_read_only_cache_still_serves(cache: Path, tmp_path: Path, monkeypatch) -> None:
    data = _csv(tmp_path / "d.csv")
    cached_table(data, label="label")

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise PermissionError("read-only file system")

    monkeypatch.setattr(table_cache.os, "utime", refuse)
    parses = _parses(monkeypatch)
    assert len(cached_table(data, label="label")) == 50 and parses == []


def test_bad_data_is_an_error_every_time_and_never_cached(
    cache: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("a,label\n1,x\nnot-a-number,y\n")
    for _ in range(2):
        with pytest.raises(DataError, match=r"bad\.csv:3"):
            cached_table(bad, label="label")
    assert not cache.exists() or not [p for p in cache.iterdir() if p.is_dir()]


def test_a_missing_file_is_named(cache: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.csv"):
        cached_table(tmp_path / "nope.csv", label="label")


def test_only_the_newest_entries_are_kept(cache: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(table_cache, "KEEP", 3)
    files = [_csv(tmp_path / f"d{i}.csv", shift=i) for i in range(5)]
    seen: set[Path] = set()
    for i, f in enumerate(files):
        cached_table(f, label="label")
        for entry in {p for p in cache.iterdir() if p.is_dir()} - seen:
            os.utime(entry, (1000.0 * (i + 1),) * 2)  # written in this order, clock or not
            seen.add(entry)
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 3
    parses = _parses(monkeypatch)
    cached_table(files[-1], label="label")
    cached_table(files[2], label="label")
    assert parses == []


def test_a_new_parser_never_reads_an_old_entry(cache: Path, tmp_path: Path, monkeypatch) -> None:
    data = _csv(tmp_path / "d.csv")
    cached_table(data, label="label")
    monkeypatch.setattr(table_cache, "_code_digest", lambda: "another fedstream version")
    parses = _parses(monkeypatch)
    cached_table(data, label="label")
    assert len(parses) == 1


def test_a_pinned_table_is_the_pinned_content_even_after_the_file_changed(
    cache: Path, tmp_path: Path, monkeypatch
) -> None:
    # The driver checks and caches the file; a worker that loads it after an edit (rows
    # appended mid-run) must see what the driver checked, not the new rows.
    data = _csv(tmp_path / "d.csv", rows=50)
    pinned = table_cache.content_digest(data)
    first = cached_table(data, label="label", sha256=pinned)
    _csv(data, rows=80)
    parses = _parses(monkeypatch)
    again = cached_table(data, label="label", sha256=pinned)
    assert parses == [] and len(again) == len(first) == 50


@pytest.mark.parametrize("cache_on", [True, False])
def test_a_file_that_is_not_the_pinned_content_is_refused_after_parsing(
    cache_on: bool, tmp_path: Path, monkeypatch
) -> None:
    # Nothing cached for the pin (or no cache at all): the file is parsed, and refused
    # since it is not the content the run pinned.
    monkeypatch.setenv(table_cache.ENV, str(tmp_path / "cache") if cache_on else "off")
    data = _csv(tmp_path / "d.csv", rows=50)
    pinned = table_cache.content_digest(data)
    _csv(data, rows=80)
    with pytest.raises(DataError, match=r"d\.csv: the file changed after the run pinned"):
        cached_table(data, label="label", sha256=pinned)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_a_group_column_is_cached_with_the_table(cache: Path, tmp_path: Path, monkeypatch) -> None:
    data = tmp_path / "g.csv"
    data.write_text("site,a,label\n" + "".join(f"s{i % 3},{i},{'xy'[i % 2]}\n" for i in range(30)))
    first = cached_table(data, label="label", group="site")
    parses = _parses(monkeypatch)
    again = cached_table(data, label="label", group="site")
    assert parses == [] and again.group_names == first.group_names == ["s0", "s1", "s2"]
    np.testing.assert_array_equal(again.groups, first.groups)
    assert cached_table(data, label="label", exclude=["site"]).groups is None  # parsed again
