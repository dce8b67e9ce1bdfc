"""Session set-up shared by every test."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from fedstream.sim.table_cache import ENV as CACHE_ENV

_OWN_CACHE = pytest.StashKey[str]()  # the cache folder this session made, and removes


def pytest_configure(config: pytest.Config) -> None:
    # Parsed data files are cached on disk (sim/table_cache.py); the tests, and the
    # `fedstream` processes they start, keep theirs in a folder of their own, never in
    # the user's ~/.cache.
    if CACHE_ENV not in os.environ:
        os.environ[CACHE_ENV] = tempfile.mkdtemp(prefix="fedstream-test-cache-")
        config.stash[_OWN_CACHE] = os.environ[CACHE_ENV]


def pytest_unconfigure(config: pytest.Config) -> None:
    own = config.stash.get(_OWN_CACHE, None)
    if own is not None:
        shutil.rmtree(own, ignore_errors=True)

