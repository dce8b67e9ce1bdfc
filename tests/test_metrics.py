"""The prequential metric and the trivial predictors against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedstream.client.metrics import Prequential, References


def test_accuracy_and_fading_by_hand() -> None:
    m = Prequential(fading=0.5)
    m.update(np.array([True, False]), np.array([0.1, 0.9]))
    m.update(np.array([True]), np.array([0.2]))
    assert m.seen == 3 and m.correct == 2
    assert m.accuracy == pytest.approx(2 / 3)
    assert m.loss == pytest.approx(1.2 / 3)
    # outcomes oldest-first 1, 0, 1 with weights 0.25, 0.5, 1
    assert m.fading_accuracy == pytest.approx((0.25 + 1.0) / (0.25 + 0.5 + 1.0))


def test_batching_does_not_change_the_result() -> None:
    rng = np.random.default_rng(0)
    c = rng.random(100) < 0.7
    loss = rng.random(100)
    whole, parts = Prequential(0.9), Prequential(0.9)
    whole.update(c, loss)
    for i in range(0, 100, 7):
        parts.update(c[i : i + 7], loss[i : i + 7])
    assert parts.fading_accuracy == pytest.approx(whole.fading_accuracy)
    assert parts.accuracy == whole.accuracy


def test_empty_is_nan_not_error() -> None:
    assert np.isnan(Prequential().accuracy)


def _one_at_a_time(labels: list[int], n_classes: int) -> tuple[int, int]:
    """The trivial predictors as their definition reads, a label at a time."""
    counts, last, no_change, majority = [0] * n_classes, 0, 0, 0
    for y in labels:
        no_change += y == last
        majority += y == counts.index(max(counts))  # the first of the most frequent
        counts[y] += 1
        last = y
    return no_change, majority


def test_references_by_hand() -> None:
    ref = References.new(3)
    # no-change predicts 0, 2, 2, 1, 1; majority predicts 0, 2, 2, 2, 1 (ties: the first)
    assert ref.score(np.array([2, 2, 1, 1, 0])) == (2, 1)
    assert ref.counts.tolist() == [1, 2, 2] and ref.last == 0


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 6).flatmap(
        lambda c: st.tuples(st.just(c), st.lists(st.integers(0, c - 1), max_size=80))
    ),
    st.lists(st.integers(1, 30), min_size=1, max_size=8),
)
def test_references_score_as_their_definition_in_any_batching(
    classes_and_labels: tuple[int, list[int]], cuts: list[int]
) -> None:
    n_classes, labels = classes_and_labels
    ref, got, at = References.new(n_classes), [0, 0], 0
    for size in cuts * (len(labels) // sum(cuts) + 1):
        if at >= len(labels):
            break
        batch = np.array(labels[at : at + size], dtype=np.int64)
        no_change, majority = ref.score(batch)
        got = [got[0] + no_change, got[1] + majority]
        ref = References.from_state(ref.state_dict())  # as a device's round ends
        at += size
    assert tuple(got) == _one_at_a_time(labels, n_classes)


def test_references_take_many_classes_in_blocks() -> None:
    """More labels than one block holds with 5,000 classes: same as one at a time."""
    rng = np.random.default_rng(1)
    labels = rng.zipf(1.5, 400) % 5000
    assert References.new(5000).score(labels) == _one_at_a_time(labels.tolist(), 5000)
