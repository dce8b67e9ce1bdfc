"""Data files parsed once, not once per process: a cache of loaded tables on disk.

`fedstream sim` builds the federation in every process that needs it: the driver (to
check the config before Ray starts) and each Ray worker. Parsing a file is the costly
part (seconds for a few hundred thousand rows, minutes for gigabytes), and each process
holding its own copy of the arrays multiplies the memory by the workers. So the first
process to load a file stores its arrays as .npy files, and every later one maps them
(pages shared through the OS cache, copy-on-write), in this run and the next ones.

An entry is keyed by the file's content (SHA-256, about 1 s a GB: nothing next to
parsing it), the load arguments, and the parser's and this module's own source, so an
edited file, other columns or another fedstream version never read a stale entry, even
when the edit kept the file's size and time. Entries are written to a temporary folder
and renamed into place, so concurrent processes never see half an entry. Anything that
goes wrong with the cache (unwritable folder, a damaged entry) falls back to parsing.

Where: `$FEDSTREAM_CACHE_DIR`, else `$XDG_CACHE_HOME/fedstream/tables`, else
`~/.cache/fedstream/tables`; `FEDSTREAM_CACHE_DIR=off` switches it off. The newest
`KEEP` entries are kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from time import time as now

import numpy as np

from fedstream.client.sources import tabular
from fedstream.client.sources.base import DataError
from fedstream.client.sources.tabular import Format, Table, load_table

ENV = "FEDSTREAM_CACHE_DIR"
KEEP = 8  # entries kept; older ones are removed when a new one is written
STAGING = ".staging-"  # folders being written, renamed into place when whole
STALE_STAGING = 3600.0  # seconds after which a staging folder is a killed writer's leftover
SAY_READING = 64_000_000  # bytes: a file this large is said to be read (it takes a while)
_ARRAYS = ("x", "y")


def cache_dir() -> Path | None:
    """The cache folder, or None when switched off."""
    chosen = os.environ.get(ENV)
    if chosen is not None:
        off = chosen.strip().lower() in ("", "off", "0", "false", "no")
        return None if off else Path(chosen).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedstream" / "tables"


def cached_table(
    path: str | Path,
    *,
    label: str,
    features: Sequence[str] | None = None,
    time: str | None = None,
    fmt: Format = "auto",
    exclude: Sequence[str] = (),
    group: str | None = None,
    sha256: str = "",
    classes: Sequence[str] | None = None,
) -> Table:
    """`load_table`'s result for these arguments, from the cache when it holds it.

    `sha256` pins the file's content (`content_digest`): the table is then exactly that
    content's, from the cache without reading the file again, or parsed and refused if
    the file no longer has that content."""
    args = {"label": label, "features": features, "time": time, "fmt": fmt,
            "exclude": list(exclude), "group": group,
            "classes": None if classes is None else list(classes)}
    root = cache_dir()
    try:
        content = sha256 or (content_digest(path) if root is not None else "")
    except OSError:
        content = ""  # a missing file: load_table names the problem
    entry = root / _key(content, args) if root is not None and content else None
    table = _read(entry) if entry is not None else None
    if table is None:
        _say_reading(Path(path), cached=entry is not None)
        table = load_table(path, **args)  # a DataError propagates: nothing is cached
        if sha256:
            _check_pinned(Path(path), sha256)
        if entry is not None:
            _write(root, entry, table, Path(path))
    return table


def _say_reading(path: Path, cached: bool) -> None:
    """A large file's parse is said before it starts: 17.5 s of quiet for 316 MB otherwise."""
    with contextlib.suppress(OSError):
        size = path.stat().st_size
        if size >= SAY_READING:
            later = "; later runs take it from the cache" if cached else ""
            print(f"fedstream: reading {path} ({size / 1e6:.0f} MB){later}", file=sys.stderr,
                  flush=True)


def content_digest(path: str | Path) -> str:
    """SHA-256 of the file's bytes, as 64 hex digits (about 1 s a GB)."""
    with Path(path).expanduser().open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _check_pinned(path: Path, sha256: str) -> None:
    """The file just parsed must still be the pinned content (checked after parsing, so an
    edit made while it was read is caught too)."""
    now = content_digest(path)
    if now != sha256:
        raise DataError(
            f"{path}: the file changed after the run pinned its content (stream.sha256 "
            f"{sha256[:12]}..., now {now[:12]}...): a run reads one version of its data"
        )


def _key(content: str, args: dict) -> str:
    described = {
        "content": content,
        "args": {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in args.items()},
        "code": _code_digest(),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]


@cache
def _code_digest() -> str:
    """The parser's and this module's source: a new version never reads an old entry."""
    digest = hashlib.sha256()
    for module in (tabular.__file__, __file__):
        digest.update(Path(module).read_bytes())
    return digest.hexdigest()


def _read(entry: Path) -> Table | None:
    try:
        meta = json.loads((entry / "meta.json").read_text())
        x, y = (np.load(entry / f"{name}.npy", mmap_mode="c") for name in _ARRAYS)
        classes, features = list(meta["classes"]), list(meta["features"])
        if x.shape != (meta["rows"], len(features)) or y.shape != (meta["rows"],):
            return None
        if len(y) and (y.min() < 0 or y.max() >= len(classes)):
            return None  # labels a model of len(classes) outputs cannot take: damaged
        time = np.load(entry / "time.npy", mmap_mode="c") if meta.get("time") else None
        if time is not None and time.shape != y.shape:
            return None
        groups, group_names = None, meta.get("group_names")
        if group_names is not None:
            groups = np.load(entry / "groups.npy", mmap_mode="c")
            if groups.shape != y.shape or (len(groups) and (
                groups.min() < 0 or groups.max() >= len(group_names)
            )):
                return None
        with contextlib.suppress(OSError):  # a read-only cache serves all the same
            os.utime(entry)  # recently used: pruned last
        return Table(x=x, y=y, classes=classes, features=features, time=time, groups=groups,
                     group_names=group_names)
    except Exception:  # absent, or damaged in any way: parse again (and overwrite)
        return None


def _write(root: Path, entry: Path, table: Table, source: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{STAGING}{entry.name}-", dir=root))
    except OSError:
        return  # a cache that cannot be written costs only the time it would have saved
    try:
        for name in _ARRAYS:
            np.save(staging / f"{name}.npy", np.ascontiguousarray(getattr(table, name)))
        if table.groups is not None:
            np.save(staging / "groups.npy", np.ascontiguousarray(table.groups))
        if table.time is not None:  # stream.arrival = 'time' replays rows at these
            np.save(staging / "time.npy", np.ascontiguousarray(table.time))
        meta = {
            "source": str(source),
            "rows": len(table),
            "classes": table.classes,
            "features": table.features,
            "group_names": table.group_names,
            "time": table.time is not None,
        }
        (staging / "meta.json").write_text(json.dumps(meta))
        staging.chmod(0o755)  # mkdtemp's 0700 would shut other users out of a shared cache
        if entry.exists():
            shutil.rmtree(entry, ignore_errors=True)
        staging.rename(entry)
        _prune(root)
    except OSError:
        pass
    finally:  # also on Ctrl-C or a MemoryError: no half-written entry is left behind
        shutil.rmtree(staging, ignore_errors=True)


def _prune(root: Path) -> None:
    """Keep the newest KEEP entries, and drop staging folders a killed process left."""
    started = now()
    entries = []
    for path in root.iterdir():
        if path.name.startswith(STAGING):
            if started - path.stat().st_mtime > STALE_STAGING:
                shutil.rmtree(path, ignore_errors=True)
        elif path.is_dir():
            entries.append(path)
    entries.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)
