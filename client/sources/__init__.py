"""Data sources: synthetic drifting streams, replayed arrays and tabular files."""

from .base import DataError, Source
from .drift import DriftSchedule, staggered
from .replay import ArraySource, load_digits_arrays
from .synthetic import GaussianMixture, RotatingHyperplane
from .tabular import Table, load_table

__all__ = [
    "ArraySource",
    "DataError",
    "DriftSchedule",
    "GaussianMixture",
    "RotatingHyperplane",
    "Source",
    "Table",
    "load_digits_arrays",
    "load_table",
    "staggered",
]
