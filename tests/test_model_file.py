"""The saved global model: written whole, read back without running pickled code, and
carrying what using it takes (architecture, input shape, the label of each output)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from fedstream.protocol import model_file
from fedstream.protocol.config import load
from fedstream.protocol.models import build_model
from fedstream.server.records import History
from fedstream.sim.federation import federation
from fedstream.sim.results import save_model


def _csv(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    rows = ["temp [°C],pressure,state"]
    for _ in range(120):
        t, p = rng.normal(size=2)
        rows.append(f"{t:.3f},{p:.3f},{'stormy' if t + p > 1 else 'calm' if t > p else 'dry'}")
    path = tmp_path / "weather.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_a_csv_run_saves_its_classes_and_columns_with_the_model(tmp_path: Path) -> None:
    path = _csv(tmp_path)
    cfg = load(overrides=["stream.source=csv", f'stream.path="{path}"', "stream.label=state",
                          f'output.dir="{tmp_path / "out"}"', "learner.hidden=[8, 4]"])
    (tmp_path / "out").mkdir()
    table_classes = federation(cfg).dataset.classes
    trained = build_model("mlp", (2,), 3, hidden=(8, 4), seed=7)  # other weights than seed 0
    written = save_model(cfg, ArrayRecord(trained.state_dict()), History(rounds=5))

    saved = model_file.load(tmp_path / "out")  # the folder, or the file itself
    assert written == tmp_path / "out" / "model.pt"
    assert model_file.load(written).classes == saved.classes
    assert saved.classes == table_classes and sorted(saved.classes) == ["calm", "dry", "stormy"]
    assert saved.features == ("temp [°C]", "pressure")
    assert saved.feature_shape == (2,) and saved.hidden == (8, 4) and saved.server_round == 5
    model = saved.build()
    assert not model.training
    x = torch.randn(16, 2)
    with torch.no_grad():
        assert torch.equal(model(x), trained.eval()(x))
    # Nothing but tensors and plain values: torch's safe loader reads it as it is.
    raw = torch.load(written, weights_only=True)
    assert raw["format"] == model_file.FORMAT and set(raw["state_dict"]) == set(
        trained.state_dict())


def test_a_synthetic_run_labels_outputs_by_class_index(tmp_path: Path) -> None:
    cfg = load(overrides=[f'output.dir="{tmp_path}"', "stream.n_classes=4",
                          "stream.n_features=6", "learner.model=logreg"])
    save_model(cfg, federation(cfg).initial_arrays(), History(rounds=1))
    saved = model_file.load(tmp_path / "model.pt")
    assert saved.classes == ("0", "1", "2", "3") and saved.features == ()
    assert saved.build()(torch.zeros(3, 6)).shape == (3, 4)


def test_stream_classes_fix_a_files_labels_and_name_a_synthetic_models_outputs(
    tmp_path: Path,
) -> None:
    from fedstream.client.sources import DataError

    path = _csv(tmp_path)
    base = ["stream.source=csv", f'stream.path="{path}"', "stream.label=state",
            f'output.dir="{tmp_path}"']
    # A file's labels take the listed order (not sorted), and a class the file lacks keeps
    # its output.
    cfg = load(overrides=[*base, 'stream.classes=["stormy", " dry", "calm", "foggy"]'])
    data = federation(cfg).dataset
    assert data.classes == ("stormy", "dry", "calm", "foggy")
    save_model(cfg, federation(cfg).initial_arrays(), History(rounds=1))
    assert model_file.load(tmp_path).classes == ("stormy", "dry", "calm", "foggy")
    # A label the list lacks is named with its line.
    with pytest.raises(DataError, match=r"weather\.csv:\d+: column 'state': unknown label"):
        _ = federation(load(overrides=[*base, 'stream.classes=["calm", "dry"]'])).dataset
    # A built-in source: the names must match its classes, and name the model's outputs.
    cfg = load(overrides=[f'output.dir="{tmp_path / "syn"}"', "stream.n_classes=3",
                          'stream.classes=["a", "b", "c"]'])
    (tmp_path / "syn").mkdir()
    save_model(cfg, federation(cfg).initial_arrays(), History(rounds=1))
    assert model_file.load(tmp_path / "syn").classes == ("a", "b", "c")
    with pytest.raises(ValueError, match=r"stream.classes names 2 classes, but the "
                       r"gaussian_mixture stream has 3 \(stream.n_classes\)"):
        load(overrides=["stream.n_classes=3", 'stream.classes=["a", "b"]'])
    with pytest.raises(ValueError, match="the digits stream has 10"):
        load(overrides=["stream.source=digits", 'stream.classes=["a", "b"]'])
    with pytest.raises(ValueError, match="each class needs a name of its own"):
        load(overrides=["stream.n_classes=2", 'stream.classes=["a", " a"]'])


def test_a_file_naming_a_factory_builds_only_when_its_code_is_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The file names the module; building imports it and runs it.
    (tmp_path / "own_models.py").write_text(
        "from torch import nn\n"
        "def make(shape, n_classes):\n"
        "    return nn.Sequential(nn.Linear(shape[0], n_classes))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "out").mkdir()
    cfg = load(overrides=[f'output.dir="{tmp_path / "out"}"', "stream.n_classes=3",
                          "stream.n_features=4", "learner.model=own_models:make"])
    save_model(cfg, federation(cfg).initial_arrays(), History(rounds=1))
    saved = model_file.load(tmp_path / "out")
    with pytest.raises(ValueError, match=r"names the factory 'own_models:make'.*trust_code=True"):
        saved.build()
    assert saved.build(trust_code=True)(torch.zeros(2, 4)).shape == (2, 3)
    # A bare module name is no built-in either: refused before anything is imported.
    (tmp_path / "side_effect.py").write_text("import builtins\nbuiltins.IMPORTED = True\n")
    import builtins
    import dataclasses

    bare = dataclasses.replace(saved, model="side_effect")
    with pytest.raises(ValueError, match="trust_code=True"):
        bare.build()
    with pytest.raises(ValueError, match="not a built-in model"):
        bare.build(trust_code=True)
    assert not hasattr(builtins, "IMPORTED")


def test_a_missing_or_foreign_file_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/model.pt: no such model file"):
        model_file.load(tmp_path)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match=f"{other}: not a fedstream model file"):
        model_file.load(other)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match=f"{garbage}: not a fedstream model file"):
        model_file.load(garbage)


def test_a_replaced_model_leaves_no_temporary_beside_it(tmp_path: Path) -> None:
    cfg = load(overrides=[f'output.dir="{tmp_path}"', "learner.model=logreg"])
    arrays = federation(cfg).initial_arrays()
    for server_round in (1, 2):
        model_file.save(tmp_path, arrays, cfg, (20,), model_file.class_labels((), 10),
                        server_round=server_round)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    assert model_file.load(tmp_path).server_round == 2


def test_after_a_files_drift_the_classes_are_named_as_the_run_ended(tmp_path: Path) -> None:
    # Drift on a recorded file renames its classes: the final model scores the renamed
    # ones, and `classes` must say which original class each output now stands for.
    cfg = load(overrides=["stream.source=csv", f'stream.path="{_csv(tmp_path)}"',
                          "stream.label=state", f'output.dir="{tmp_path}"',
                          "drift.kind=abrupt", "drift.at=[2.0]", "drift.stagger=0"])
    fed = federation(cfg)
    save_model(cfg, fed.initial_arrays(), History(rounds=3))
    saved = model_file.load(tmp_path)
    original = fed.dataset.classes
    assert sorted(saved.classes) == sorted(original) and saved.classes != original
    source = fed.source(0)  # a client's stream, in round 3
    index = np.arange(source.length)
    t = np.full(len(index), 3.0)
    renamed, truth = source.draw(index, t)[1], source.base.draw(index, t)[1]
    assert [saved.classes[j] for j in renamed] == [original[c] for c in truth]
    save_model(cfg, fed.initial_arrays(), History(rounds=1))  # before the drift
    assert model_file.load(tmp_path).classes == original
    # A drift at time 2 is round 3's: a run of 2 rounds ended before it.
    save_model(cfg, fed.initial_arrays(), History(rounds=2))
    assert model_file.load(tmp_path).classes == original
