"""Files that are whole or absent: written beside their name, fsynced, renamed over it.

A crash or a power cut mid-write leaves the previous file (or none), never half of one:
the bytes reach the disk before the rename, and the rename is made durable in turn.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_durably(final: Path, tmp: Path, write: Callable[[BinaryIO], None]) -> Path:
    """`write` the content into `tmp`, then put it in place as `final`."""
    with tmp.open("wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())  # the rename must not land before the bytes
    os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)  # the rename itself, on the disk
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return final
