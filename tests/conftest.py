"""Session set-up shared by every test."""

from __future__ import annotations

import os
import tempfile

import pytest

from fedstream.sim.table_cache import ENV as CACHE_ENV


def pytest_configure(config: pytest.Config) -> None:
    # Parsed data files are cached on disk (sim/table_cache.py); the tests, and the
    # `fedstream` processes they start, keep theirs in a folder of their own, never in
    # the user's ~/.cache.
    if CACHE_ENV not in os.environ:
        os.environ[CACHE_ENV] = tempfile.mkdtemp(prefix="fedstream-test-cache-")
