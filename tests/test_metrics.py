"""The prequential metric and the trivial predictors against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedstream.client.metrics import Prequential, References, RoundOutcome, class_tally


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


def _scores_by_definition(pairs: list[tuple[int, int]], n_classes: int) -> dict[str, float]:
    """Balanced accuracy, Cohen's kappa and macro F1 as textbooks define them, from the
    (label, prediction) pairs' confusion matrix, a pair at a time."""
    confusion = [[0] * n_classes for _ in range(n_classes)]
    for y, p in pairs:
        confusion[y][p] += 1
    n = len(pairs)
    row = [sum(confusion[c]) for c in range(n_classes)]
    col = [sum(confusion[r][c] for r in range(n_classes)) for c in range(n_classes)]
    recalls = [confusion[c][c] / row[c] for c in range(n_classes) if row[c]]
    f1s = [2 * confusion[c][c] / (row[c] + col[c]) for c in range(n_classes) if row[c] + col[c]]
    agree = sum(confusion[c][c] for c in range(n_classes)) / n
    chance = sum(row[c] * col[c] for c in range(n_classes)) / n**2
    return {
        "balanced_accuracy": sum(recalls) / len(recalls),
        "cohen_kappa": (agree - chance) / (1 - chance) if chance < 1 else None,
        "macro_f1": sum(f1s) / len(f1s),
    }


@settings(max_examples=150, deadline=None)
@given(
    st.integers(2, 6).flatmap(
        lambda c: st.tuples(
            st.just(c),
            st.lists(st.tuples(st.integers(0, c - 1), st.integers(0, c - 1)), min_size=1,
                     max_size=60),
            st.integers(1, 20),
        )
    )
)
def test_class_scores_from_summed_tallies_are_the_confusion_matrix_definitions(
    drawn: tuple[int, list[tuple[int, int]], int],
) -> None:
    """Tallies of any split of the samples (clients, rounds) summed give the scores of the
    whole: what makes them summable under secure aggregation."""
    from fedstream.server.records import CLASS_SCORES, class_scores

    n_classes, pairs, cut = drawn
    y, p = (np.array(v, dtype=np.int64) for v in zip(*pairs, strict=True))
    parts = [class_tally(y[i : i + cut], p[i : i + cut], n_classes)
             for i in range(0, len(y), cut)]
    total = np.sum(parts, axis=0)
    assert total.tolist() == [np.bincount(y, minlength=n_classes).tolist(),
                              np.bincount(p, minlength=n_classes).tolist(),
                              np.bincount(y[y == p], minlength=n_classes).tolist()]
    got = class_scores(total.ravel().tolist(), [f"c{c}" for c in range(n_classes)])
    want = _scores_by_definition(pairs, n_classes)
    for key in CLASS_SCORES:
        assert got[key] == (None if want[key] is None else pytest.approx(want[key]))
    per = got["per_class"]
    assert list(per) == [f"c{c}" for c in range(n_classes)]
    assert sum(c["samples"] for c in per.values()) == len(pairs)
    for c, counts in enumerate(per.values()):
        right = ((y == c) & (p == c)).sum()
        for key, of in (("recall", y == c), ("precision", p == c)):
            assert counts[key] == (pytest.approx(right / of.sum()) if of.any() else None)


def test_class_scores_by_hand_and_when_unknown() -> None:
    from fedstream.server.records import class_scores

    # 10 samples: 8 of class 0 (all predicted 0), 2 of class 1 (predicted 0): accuracy 80 %,
    # but the model ignores class 1: balanced accuracy 50 %, Cohen's kappa 0.
    scores = class_scores([8, 2, 10, 0, 8, 0], ["ok", "fault"])
    assert scores["balanced_accuracy"] == 0.5 and scores["cohen_kappa"] == 0.0
    assert scores["macro_f1"] == pytest.approx((2 * 8 / 18) / 2)  # class 1's F1 is 0
    assert scores["per_class"]["fault"] == {"samples": 2, "predicted": 0, "right": 0,
                                            "recall": 0.0, "precision": None}
    # One class only, always predicted: agreement by chance is 1, so kappa is undefined.
    assert class_scores([5, 0, 5, 0, 5, 0])["cohen_kappa"] is None
    assert class_scores([5, 0, 5, 0, 5, 0])["per_class"]["1"]["recall"] is None  # by index
    for unknown in (None, [], [0, 0, 0, 0, 0, 0]):
        assert set(class_scores(unknown).values()) == {None}


def test_outcomes_absorb_each_other_class_by_class() -> None:
    a = RoundOutcome(seen=2, correct=1, no_change_correct=1, majority_correct=2,
                     classes=class_tally(np.array([0, 1]), np.array([0, 0]), 2))
    total = RoundOutcome()
    total.absorb(a)
    total.absorb(a)
    assert (total.seen, total.correct, total.no_change_correct, total.majority_correct) == (
        4, 2, 2, 4)
    assert total.classes.tolist() == [[2, 2], [4, 0], [2, 0]]


def test_a_prediction_outside_the_classes_is_named() -> None:
    """A model with more outputs than classes (a user's factory, deployed unchecked)."""
    with pytest.raises(ValueError, match=r"a prediction outside the 2 classes \(got 0 to 3\)"):
        class_tally(np.array([0, 1]), np.array([0, 3]), 2)
    with pytest.raises(ValueError, match="a label outside the 2 classes"):
        class_tally(np.array([0, 2]), np.array([0, 1]), 2)
    assert class_tally(np.array([], np.int64), np.array([], np.int64), 2).tolist() == [[0, 0]] * 3
