"""The learner: test-then-train order, modes, optimizers, schedules, state round trip."""

from __future__ import annotations

import pickle
import re

import numpy as np
import pytest
import torch

from fedstream.client.learner import Learner, Spec
from fedstream.protocol.config import DetectorConfig, LearnerConfig


def _data(n: int = 64, d: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    return x, y


def _learner(**kw: object) -> Learner:
    det = kw.pop("detector", DetectorConfig(kind="none"))
    cfg = LearnerConfig(device="cpu", **kw)  # type: ignore[arg-type]
    return Learner(Spec(feature_shape=(5,), n_classes=2, learner=cfg, detector=det))


def test_predictions_are_scored_before_learning() -> None:
    x, y = _data()
    learner = _learner(batch_size=64, lr=0.5)
    with torch.no_grad():
        before = (learner.model(torch.from_numpy(x)).argmax(1).numpy() == y).sum()
    outcome = learner.learn(x, y)
    assert outcome.correct == before
    assert outcome.seen == 64 and learner.offset == 64


def test_online_learning_improves_on_a_stream() -> None:
    learner = _learner(batch_size=4, lr=0.1)
    for i in range(10):
        outcome = learner.learn(*_data(seed=i))
    assert outcome.correct / outcome.seen > 0.85


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("schedule", ["constant", "step", "exponential", "cosine"])
def test_optimizers_and_schedules_learn(optimizer: str, schedule: str) -> None:
    learner = _learner(optimizer=optimizer, schedule=schedule, lr=0.05, step_size=5, gamma=0.9)
    for i in range(5):
        learner.learn(*_data(seed=i))
    assert learner.metric.accuracy > 0.6
    if schedule != "constant":
        assert learner.optimizer.param_groups[0]["lr"] < 0.05


def test_batch_mode_trains_over_a_bounded_window() -> None:
    learner = _learner(mode="batch", epochs=3, window=40, batch_size=8)
    learner.learn(*_data(seed=1))
    assert learner.window_y is not None and len(learner.window_y) == 40
    for i in range(2, 6):
        learner.learn(*_data(seed=i))
    assert learner.metric.accuracy > 0.7


@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("mode", ["online", "batch"])
def test_state_round_trip_continues_exactly(mode: str, standardize: bool) -> None:
    kw = {"mode": mode, "optimizer": "adam", "schedule": "cosine", "standardize": standardize}
    a, b = _learner(**kw), _learner(**kw)
    a.learn(*_data(seed=1))
    b.learn(*_data(seed=1))
    c = _learner(**kw)
    c.load_state_bytes(b.state_bytes())
    c.set_weights(b.get_weights())  # a round starts from the (global) weights it is sent
    ours, theirs = a.learn(*_data(seed=2)), c.learn(*_data(seed=2))
    for k, v in a.get_weights().items():
        torch.testing.assert_close(v, c.get_weights()[k])
    assert c.offset == a.offset == 128
    assert c.metric == a.metric
    assert (ours.no_change_correct, ours.majority_correct) == (
        theirs.no_change_correct, theirs.majority_correct)
    assert c.references.counts.tolist() == a.references.counts.tolist() == [
        int((np.concatenate([_data(seed=1)[1], _data(seed=2)[1]]) == k).sum()) for k in (0, 1)]


def test_a_round_reports_the_trivial_predictors_on_its_own_samples() -> None:
    """The same samples the model was scored on; a state from before they were kept
    starts them afresh instead of failing."""
    learner = _learner()
    y = np.array([1, 1, 1, 0, 0, 1], dtype=np.int64)
    outcome = learner.learn(np.zeros((6, 5), dtype=np.float32), y)
    assert outcome.seen == 6
    # no-change predicts 0, 1, 1, 1, 0, 0 (0 before any label): right 3 times
    assert outcome.no_change_correct == 3
    # majority predicts 0, 1, 1, 1, 1, 1 (ties go to the first class): right 3 times
    assert outcome.majority_correct == 3
    old = pickle.loads(learner.state_bytes())
    del old["references"]
    fresh = _learner()
    fresh.load_state_bytes(pickle.dumps(old))
    assert fresh.references.counts.tolist() == [0, 0] and fresh.offset == 6
    # A device's state from a run with fewer classes: its counts start afresh too.
    three = Learner(Spec(feature_shape=(5,), n_classes=3, learner=LearnerConfig(device="cpu"),
                         detector=DetectorConfig(kind="none")))
    three.load_state_bytes(learner.state_bytes())
    assert three.learn(np.zeros((2, 5), np.float32), np.array([2, 2])).seen == 2
    assert three.references.counts.tolist() == [0, 0, 2]


@pytest.mark.parametrize("kw", [{"mode": "online"}, {"mode": "batch"},
                                {"mode": "online", "model": "tally_models:dropped"}])
def test_a_round_tallies_its_predictions_class_by_class(kw: dict, tmp_path, monkeypatch) -> None:
    """The predictions that were scored, whichever forward scored them: in batch mode (and
    for a dropout model, in eval mode) they are the model's before the round's training."""
    (tmp_path / "tally_models.py").write_text(
        "from torch import nn\n"
        "def dropped(shape, n_classes):\n"
        "    return nn.Sequential(nn.Linear(shape[0], 16), nn.Dropout(0.5), nn.ReLU(),"
        " nn.Linear(16, n_classes))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    learner = _learner(batch_size=50, **kw)
    x, y = _data(n=50, seed=3)
    learner.model.eval()
    with torch.no_grad():
        before = learner.model(torch.from_numpy(x)).argmax(1).numpy()
    outcome = learner.learn(x, y)  # one mini-batch: scored before any step
    assert outcome.classes is not None
    labels, predicted, right = outcome.classes
    assert labels.tolist() == np.bincount(y, minlength=2).tolist()
    assert predicted.tolist() == np.bincount(before, minlength=2).tolist()
    assert right.tolist() == np.bincount(y[before == y], minlength=2).tolist()
    nothing = learner.learn(x[:0], y[:0]).classes
    assert nothing is not None and nothing.tolist() == [[0, 0]] * 3


@pytest.mark.parametrize("mode", ["online", "batch"])
def test_standardising_rescues_features_on_their_own_scales(mode: str) -> None:
    # A pressure-like column (1013 +- 5) next to the informative one: raw, SGD follows the
    # big column and learns little; scaled by the running statistics, the stream is easy.
    def stream(seed: int) -> tuple[np.ndarray, np.ndarray]:
        x, _ = _data(seed=seed)
        x[:, 1] = 1013 + 5 * x[:, 1]
        x[:, 0] = 20 + 3 * x[:, 0]
        return x, (x[:, 0] > 20).astype(np.int64)

    accuracy = {}
    for standardize in (False, True):
        torch.manual_seed(0)
        learner = _learner(mode=mode, batch_size=4, lr=0.1, standardize=standardize)
        for i in range(10):
            learner.learn(*stream(i))
        accuracy[standardize] = learner.metric.accuracy
    assert accuracy[True] > 0.85
    assert accuracy[True] > accuracy[False] + 0.2, accuracy


def test_drift_is_detected_and_lr_boosted() -> None:
    det = DetectorConfig(kind="adwin", reaction="boost_lr", boost=4.0, boost_batches=1000)
    learner = _learner(batch_size=4, lr=0.01, momentum=0.0, detector=det)
    for i in range(8):
        learner.learn(*_data(seed=i))
    x, y = _data(n=400, seed=99)
    outcome = learner.learn(x, 1 - y)  # the concept flips
    assert outcome.drifts, "a label flip must be detected"
    assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(0.04)


def test_a_falling_error_is_not_drift_unless_asked() -> None:
    # While a fresh model learns, its error falls: the paper's ADWIN reports that change,
    # the default (direction "rise") does not; both find the label flip.
    found = {}
    for direction in ("both", "rise"):
        det = DetectorConfig(kind="adwin", direction=direction)
        learner = _learner(batch_size=4, lr=0.01, momentum=0.0, detector=det)
        early = [p for i in range(8) for p in learner.learn(*_data(seed=i)).drifts]
        x, y = _data(n=400, seed=99)
        found[direction] = (early, learner.learn(x, 1 - y).drifts)
    assert found["both"][0] and not found["rise"][0], found
    assert found["both"][1] and found["rise"][1], found


def test_each_detector_gets_its_own_delta_unless_one_is_set() -> None:
    # delta is ADWIN's confidence but Page-Hinkley's tolerated change per sample: one
    # default for both was wrong for one of them, and Page-Hinkley's used to be dropped.
    from fedstream.client.learner import _detector

    for kind, own in (("adwin", 0.002), ("page_hinkley", 0.005)):
        assert _detector(DetectorConfig(kind=kind)).delta == own
        assert _detector(DetectorConfig(kind=kind, delta=0.3)).delta == 0.3


def test_page_hinkley_has_no_two_sided_mode() -> None:
    with pytest.raises(ValueError, match="direction 'both' is for adwin"):
        DetectorConfig(kind="page_hinkley", direction="both")


def test_reset_optimizer_reaction_clears_momentum() -> None:
    det = DetectorConfig(kind="adwin", reaction="reset_optimizer")
    learner = _learner(batch_size=4, detector=det)
    for i in range(8):
        learner.learn(*_data(seed=i))
    learner._react()
    assert not learner.optimizer.state


def test_empty_batch_is_a_no_op() -> None:
    learner = _learner()
    out = learner.learn(np.zeros((0, 5), np.float32), np.zeros(0, np.int64))
    assert out.seen == 0 and learner.offset == 0


def test_user_model_factory(tmp_path, monkeypatch) -> None:
    (tmp_path / "my_models.py").write_text(
        "from torch import nn\n"
        "def wide(shape, n_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(shape[0], 32), nn.Tanh(),"
        " nn.Linear(32, n_classes))\n"
        "def broken(shape, n_classes):\n"
        "    return 'not a module'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    learner = _learner(model="my_models:wide")
    assert learner.model[1].out_features == 32
    learner.learn(*_data())
    with pytest.raises(ValueError, match="returned str"):
        _learner(model="my_models:broken")
    with pytest.raises(ValueError, match="cannot load factory"):
        _learner(model="my_models:missing")


def test_a_model_with_lazy_layers_is_shaped_alike_on_every_party(tmp_path, monkeypatch) -> None:
    """Its weights exist only after a batch: the server sends them before any."""
    from fedstream.protocol.models import build_model

    (tmp_path / "lazy_models.py").write_text(
        "from torch import nn\n"
        "def lazy(shape, n_classes):\n"
        "    return nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.LazyLinear(n_classes))\n"
        "def wrong(shape, n_classes):\n"
        "    return nn.Sequential(nn.Linear(3, 4), nn.LazyLinear(n_classes))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    one, two = (build_model("lazy_models:lazy", (5,), 2, seed=4) for _ in range(2))
    for (key, a), b in zip(one.state_dict().items(), two.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=key)
    assert one[0].weight.shape == (16, 5) and one.training  # left in training mode
    learner = _learner(model="lazy_models:lazy")
    learner.set_weights(one.state_dict())  # a global model loads into a client's
    assert learner.learn(*_data()).seen == 64
    with pytest.raises(ValueError, match=re.escape(
            "learner.model 'lazy_models:wrong' has lazy layers, and a batch of shape (2, 5) "
            "that would shape them raised RuntimeError")):
        build_model("lazy_models:wrong", (5,), 3)


def test_a_factory_whose_outputs_are_no_class_scores_is_named_before_any_client_runs(
    tmp_path, monkeypatch
) -> None:
    from fedstream.protocol.models import build_model, check_outputs

    (tmp_path / "odd_models.py").write_text(
        "import torch\n"
        "from torch import nn\n"
        "class Pair(nn.Module):\n"
        "    def __init__(self, n, k):\n"
        "        super().__init__(); self.lin = nn.Linear(n, k)\n"
        "    def forward(self, x):\n"
        "        return self.lin(x), x\n"
        "class Rounded(Pair):\n"
        "    def forward(self, x):\n"
        "        return self.lin(x).round().long()\n"
        "def pair(shape, k):\n"
        "    return Pair(shape[0], k)\n"
        "def rounded(shape, k):\n"
        "    return Rounded(shape[0], k)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for name, why in (("pair", "returns a tuple for a batch: its forward must return one "
                               "tensor of class scores, of shape (2, 3)"),
                      ("rounded", "gives torch.int64 outputs: class scores (logits) must be "
                                  "floating point")):
        spec = f"odd_models:{name}"
        with pytest.raises(ValueError, match=re.escape(f"learner.model '{spec}' {why}")):
            check_outputs(build_model(spec, (5,), 3), spec, (5,), 3)
    with pytest.raises(ValueError, match="cannot be imported by the clients' worker processes; "
                       "put it in a module of its own"):
        build_model("__main__:make", (5,), 3)


def test_a_dropout_model_is_scored_whole_not_as_a_random_sub_network(
    tmp_path, monkeypatch
) -> None:
    (tmp_path / "drop_models.py").write_text(
        "from torch import nn\n"
        "def drop(shape, n_classes):\n"
        "    return nn.Sequential(nn.Linear(shape[0], 64), nn.ReLU(), nn.Dropout(0.9),"
        " nn.Linear(64, n_classes))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    x, y = _data(n=256)
    learner = _learner(model="drop_models:drop", lr=1e-12, batch_size=16)
    learner.model.eval()
    with torch.no_grad():
        whole = int((learner.model(torch.from_numpy(x)).argmax(1).numpy() == y).sum())
    # The weights barely move: each pass scores what the whole network predicts.
    assert learner.learn(x, y).correct == whole == learner.learn(x, y).correct


@pytest.mark.parametrize("mode", ["online", "batch"])
def test_a_batchnorm_model_never_trains_on_a_lone_sample(tmp_path, monkeypatch, mode) -> None:
    # BatchNorm raises on a training batch of one: 33 samples in batches of 32 left one.
    (tmp_path / "bn_models.py").write_text(
        "from torch import nn\n"
        "def bn(shape, n_classes):\n"
        "    return nn.Sequential(nn.Linear(shape[0], 8), nn.BatchNorm1d(8), nn.ReLU(),"
        " nn.Linear(8, n_classes))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    learner = _learner(model="bn_models:bn", mode=mode, batch_size=32)
    x, y = _data(n=34)
    assert learner.learn(x[:1], y[:1]).seen == 1  # a round of one sample: scored only
    assert learner.learn(x[1:], y[1:]).seen == 33  # 32 + 1: the last joins the batch before
    plain = _learner(model="logreg", mode=mode, batch_size=32)
    assert [b - a for a, b in plain._spans(33)] == [32, 1]  # no batch statistics: as given
    assert [b - a for a, b in learner._spans(33)] == [33]
