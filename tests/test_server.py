"""Server pieces on real Flower messages and strategies, without a running federation."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, RecordDict
from flwr.serverapp.strategy import FedAvg, FedAvgM
from flwr.supercore.task_identity import TaskIdentity

from fedstream.protocol import messages as m
from fedstream.protocol.config import load
from fedstream.server import records, stopping
from fedstream.server.records import (
    History,
    MetricsLog,
    read_metrics,
    round_record,
    run_summary,
    secure_round_record,
    write_summary,
)
from fedstream.server.roster import Roster
from fedstream.server.rounds import _aggregate
from fedstream.server.secure import SecureOutcome
from fedstream.server.strategy import StreamFedAvg, make_strategy


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def _weights(value: float) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.full(3, value, np.float32))})


def _sent(node: int) -> Message:
    content = RecordDict({m.ARRAYS: _weights(0.0), m.CONFIG: ConfigRecord({m.ROUND: 1})})
    msg = Message(content, dst_node_id=node, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = f"msg-{node}"  # the SuperLink assigns ids
    return msg


def _reply(sent: Message, value: float, examples: int, client: int) -> Message:
    report = m.TrainReport(client=client, examples=examples, correct=examples // 2, loss_sum=1.0)
    content = RecordDict({m.ARRAYS: _weights(value), m.METRICS: report.to_record()})
    return Message(content, reply_to=sent)


def _values(arrays: ArrayRecord) -> np.ndarray:
    return arrays["w"].numpy()


def test_weighted_mean_skips_clients_without_examples() -> None:
    sent = [_sent(n) for n in (1, 2, 3)]
    replies = [_reply(sent[0], 1.0, 1, 0), _reply(sent[1], 5.0, 3, 1), _reply(sent[2], 99.0, 0, 2)]
    arrays, _ = StreamFedAvg().aggregate_train(1, replies)
    np.testing.assert_allclose(_values(arrays), 4.0)  # (1*1 + 3*5) / 4; the 0-example one left out


def test_nothing_to_aggregate_gives_none() -> None:
    assert StreamFedAvg().aggregate_train(1, [_reply(_sent(1), 1.0, 0, 0)]) == (None, None)


def test_a_single_update_is_its_own_mean_byte_for_byte_as_flower_computes_it() -> None:
    # The fast path (a secure round aggregates one message: the unmasked average) must give
    # exactly what Flower's FedAvg gives, and fail where Flower's checks fail.
    sent = [_sent(1), _sent(2)]
    values = np.random.default_rng(3).standard_normal(1000).astype(np.float32)
    steps = np.array([7, 9], dtype=np.int64)  # e.g. a BatchNorm counter
    one = Message(
        RecordDict({m.ARRAYS: ArrayRecord({"w": Array(values), "n": Array(steps)}),
                    m.METRICS: m.TrainReport(1, 4, 2, 1.0).to_record()}),
        reply_to=sent[0],
    )
    failed = Message(Error(code=1, reason="boom"), reply_to=sent[1])
    ours, _ = StreamFedAvg().aggregate_train(1, [one, failed])
    flowers, _ = FedAvg().aggregate_train(1, [one])
    assert ours["w"].data == flowers["w"].data and ours["w"].shape == flowers["w"].shape
    # The one difference: integers keep their dtype (Flower's x 1.0 makes them float64).
    assert ours["n"].numpy().dtype == np.int64 and flowers["n"].numpy().dtype == np.float64
    np.testing.assert_array_equal(ours["n"].numpy(), flowers["n"].numpy())
    two = Message(
        RecordDict({m.ARRAYS: _weights(1.0), "more": _weights(2.0),
                    m.METRICS: m.TrainReport(1, 4, 2, 1.0).to_record()}),
        reply_to=sent[0],
    )
    with pytest.raises(Exception, match="ArrayRecord"):
        FedAvg().aggregate_train(1, [two])
    with pytest.raises(Exception, match="ArrayRecord"):
        StreamFedAvg().aggregate_train(1, [two])


@pytest.mark.parametrize("strategy", ["fedavg", "fedavg-m", "fedadam", "fedyogi"])
def test_a_0d_integer_buffer_keeps_its_dtype_and_shape(strategy: str) -> None:
    """BatchNorm's `num_batches_tracked` is a 0-d int64: numpy's rounding of a 0-d array
    is a scalar, which failed every round of every BatchNorm model."""
    name, lr = ("fedavg", 3.0) if strategy == "fedavg-m" else (strategy, 1.0)
    strat = make_strategy(load(None, [f"federation.strategy={name}",
                                      f"federation.server_lr={lr}"]))
    start = {"w": Array(np.zeros(3, np.float32)), "n": Array(np.array(4, dtype=np.int64))}
    # What FedAvgM (an ArrayRecord) and FedAdam, FedYogi (numpy) step from.
    strat.current_arrays = (ArrayRecord(start) if name == "fedavg"
                            else {k: a.numpy() for k, a in start.items()})
    sent = [_sent(1), _sent(2)]
    replies = [Message(RecordDict({m.ARRAYS: ArrayRecord({"w": Array(np.full(3, v, np.float32)),
                                                          "n": Array(np.array(n, np.int64))}),
                                   m.METRICS: m.TrainReport(c, 4, 2, 1.0).to_record()}),
                       reply_to=sent[c]) for c, (v, n) in enumerate([(1.0, 6), (2.0, 8)])]
    arrays, _ = strat.aggregate_train(1, replies)
    counter = arrays["n"].numpy()
    assert counter.dtype == np.int64 and counter.shape == ()
    assert arrays["w"].numpy().dtype == np.float32


def test_default_strategy_is_fedavg_with_server_step() -> None:
    strategy = make_strategy(load())
    assert isinstance(strategy, FedAvgM) and strategy.server_learning_rate == 3.0
    strategy.current_arrays = _weights(0.0)
    arrays, _ = strategy.aggregate_train(1, [_reply(_sent(1), 1.0, 2, 0)])
    np.testing.assert_allclose(_values(arrays), 3.0)  # 0 + 3 * (1 - 0)


@pytest.mark.parametrize(("overrides", "least"), [
    ([], 1),
    (["secure_aggregation.enabled=true"], 2),  # one node connected could only fail the round
    (["secure_aggregation.enabled=true", "federation.min_clients=4"], 4),
])
def test_rounds_wait_for_the_nodes_a_round_can_use(overrides: list[str], least: int) -> None:
    strategy = make_strategy(load(overrides=overrides))
    assert strategy.min_available_nodes == strategy.min_train_nodes == least


@pytest.mark.parametrize("kind", ["fedadam", "fedyogi"])
def test_adaptive_strategies_move_towards_the_clients(kind: str) -> None:
    strategy = make_strategy(load(overrides=[f"federation.strategy={kind}"]))
    strategy.current_arrays = {"w": np.zeros(3, np.float32)}
    arrays, _ = strategy.aggregate_train(1, [_reply(_sent(1), 1.0, 2, 0)])
    assert (_values(arrays) > 0).all()
    # Flower's step (numpy float64 scalars) would return float64: twice the download.
    assert arrays["w"].numpy().dtype == np.float32


@pytest.mark.parametrize("kind", ["fedavg", "fedavgm", "fedadam", "fedyogi"])
def test_every_strategy_keeps_the_dtypes_the_clients_trained_in(kind: str) -> None:
    # A float64 counter (Flower's mean and step make one of an int64) would be clipped and
    # noised as a weight under differential privacy, and a float64 weight doubles downloads.
    overrides = {"fedavg": ["federation.server_lr=1"], "fedavgm": []}.get(
        kind, [f"federation.strategy={kind}"])
    strategy = make_strategy(load(overrides=overrides))
    sent = [_sent(1), _sent(2)]
    model = {"w": np.zeros(3, np.float32), "n": np.array([7], np.int64)}
    strategy.current_arrays = (
        ArrayRecord({k: Array(v) for k, v in model.items()}) if kind == "fedavgm" else model
    )
    for server_round in (1, 2):
        replies = [
            Message(RecordDict({
                m.ARRAYS: ArrayRecord({"w": Array(np.full(3, v, np.float32)),
                                       "n": Array(np.array([7 + server_round], np.int64))}),
                m.METRICS: m.TrainReport(c, 4, 2, 1.0).to_record()}), reply_to=msg)
            for c, (v, msg) in enumerate(zip((1.0, 2.0), sent, strict=True))
        ]
        arrays, _ = strategy.aggregate_train(server_round, replies)
        assert arrays["w"].numpy().dtype == np.float32
        assert arrays["n"].numpy().dtype == np.int64


def test_a_failed_aggregation_keeps_the_model_and_says_why() -> None:
    sent = [_sent(1), _sent(2)]
    odd = Message(
        RecordDict({m.ARRAYS: ArrayRecord({"v": Array(np.ones(2, np.float32))}),
                    m.METRICS: m.TrainReport(1, 4, 2, 1.0).to_record()}),
        reply_to=sent[1],
    )
    previous = _weights(7.0)
    arrays, error = _aggregate(StreamFedAvg(), 1, [_reply(sent[0], 1.0, 2, 0), odd], previous)
    assert arrays is previous
    assert error


def test_round_record_names_failures_and_counts() -> None:
    sent = [_sent(n) for n in (10, 11, 12)]
    replies = [_reply(sent[0], 1.0, 8, 0), Message(Error(code=1, reason="boom"), reply_to=sent[1])]
    rec = round_record(1, sent, replies, {10: 0, 11: 1, 12: 2}, seconds=0.5)
    assert rec["clients_sampled"] == 3 and rec["clients_ok"] == 1
    assert rec["examples"] == 8 and rec["correct"] == 4 and rec["accuracy"] == 0.5
    assert {(f["client"], f["node"], f["reason"]) for f in rec["failures"]} == {
        (1, 11, "boom"), (2, 12, "no reply before timeout")
    }
    assert rec["bytes_down"] > rec["bytes_up"] > 0
    assert rec["clients"]["0"]["examples"] == 8


def test_summary_says_which_rounds_were_not_aggregated_and_why() -> None:
    history = History()
    offline = "client 0: ClientUnavailable: client 0 is offline in round {}"
    for server_round, error in [(1, None), (2, "too few"), (3, "too few"), (4, "bad sum"),
                                (5, offline.format(5)), (6, offline.format(6))]:
        rec = round_record(server_round, [], [], {}, seconds=0.1)
        rec["aggregated"] = error is None
        if error:
            rec["aggregation_error"] = error
        history.add(rec)
    summary = run_summary(load(), history)
    assert summary["rounds"] == 6 and summary["rounds_aggregated"] == 1
    assert summary["aggregation_errors"] == [
        {"reason": "too few", "rounds": 2, "first_rounds": [2, 3]},
        {"reason": "bad sum", "rounds": 1, "first_rounds": [4]},
        # A reason naming its round is one reason for all of them.
        {"reason": "client 0: ClientUnavailable: client 0 is offline in this round",
         "rounds": 2, "first_rounds": [5, 6]},
    ]


def test_a_secure_run_says_what_share_of_the_summed_coordinates_was_clipped() -> None:
    # A clip far below the updates' size clips nearly everything: training then goes on
    # with updates that lost their size, and only this share tells why.
    history = History()
    model = ArrayRecord({"w": Array(np.zeros((10, 10), np.float32))})  # 100 coordinates
    for server_round, (clipped, contributors) in enumerate([(290, 3), (0, 0)], start=1):
        outcome = SecureOutcome(model, clients_ok=contributors)
        outcome.totals.update(clipped=clipped, contributors=contributors)
        rec = secure_round_record(server_round, 3, outcome, {}, seconds=0.1)
        history.add(rec)
    assert rec["summed_coordinates"] == 0 and rec["clipped_fraction"] is None  # sealed
    summary = run_summary(load(), history)
    assert summary["clipped_fraction"] == pytest.approx(290 / 300)
    assert run_summary(load(), History())["clipped_fraction"] is None


def test_summary_gives_kappa_against_the_trivial_predictors() -> None:
    history = History()
    for correct, no_change, majority in [(50, 30, 45), (10, 10, 5)]:  # 60, 40, 50 of 100
        rec = round_record(1, [], [], {}, seconds=0.1)
        rec.update(examples=50, correct=correct, no_change_correct=no_change,
                   majority_correct=majority)
        history.add(rec)
    summary = run_summary(load(), history)
    assert summary["no_change_accuracy"] == 0.4 and summary["majority_accuracy"] == 0.5
    assert summary["kappa_temporal"] == pytest.approx(0.2 / 0.6)
    assert summary["kappa_m"] == pytest.approx(0.1 / 0.5)
    empty = run_summary(load(), History())
    assert [empty[k] for k in ("no_change_accuracy", "kappa_temporal")] == [None, None]
    history.no_change_correct = history.seen  # a predictor always right: kappa undefined
    assert run_summary(load(), history)["kappa_temporal"] is None

    # A client too old to count them: the round's totals, and the run's, are unknown.
    old = m.TrainReport(client=0, examples=10, correct=5, loss_sum=1.0).to_record()
    del old["no-change-correct"], old["majority-correct"]
    report = m.TrainReport.from_record(old)
    assert report.no_change_correct is None and "no-change-correct" not in report.to_record()
    from fedstream.server.records import _known_sum

    assert _known_sum([3, None]) is None and _known_sum([3, 4]) == 7 and _known_sum([]) == 0
    history.add({**round_record(2, [], [], {}, seconds=0.1), "no_change_correct": None})
    assert run_summary(load(), history)["no_change_accuracy"] is None


def test_rounds_sum_the_clients_class_tallies_and_the_summary_names_the_classes() -> None:
    sent = [_sent(n) for n in (1, 2)]
    replies = []
    for node, (client, tally) in enumerate([(0, [3, 1, 2, 2, 2, 1]), (1, [0, 4, 1, 3, 0, 3])]):
        report = m.TrainReport(client=client, examples=4, correct=3, loss_sum=1.0, classes=tally)
        replies.append(Message(RecordDict({m.ARRAYS: _weights(0.0),
                                           m.METRICS: report.to_record()}), reply_to=sent[node]))
    rec = round_record(1, sent, replies, {}, seconds=0.1)
    assert rec["classes"] == {"labels": [3, 5], "predicted": [3, 5], "right": [2, 4]}
    history = History()
    history.add(rec)
    history.add(rec)
    summary = run_summary(load(None, ['stream.n_classes=2', 'stream.classes=["ok", "fault"]']),
                          history)
    assert summary["per_class"]["fault"] == {"samples": 10, "predicted": 10, "right": 8,
                                             "recall": 0.8, "precision": 0.8}
    assert summary["balanced_accuracy"] == pytest.approx((4 / 6 + 0.8) / 2)
    assert list(run_summary(load(), history)["per_class"]) == ["0", "1"]  # unnamed: by index

    # A client too old to count them, or counting other classes: unknown for the run.
    old = m.TrainReport(client=2, examples=4, correct=3, loss_sum=1.0).to_record()
    assert "class-tally" not in old and m.TrainReport.from_record(old).classes is None
    unknown = round_record(2, sent, [replies[0], Message(RecordDict(
        {m.ARRAYS: _weights(0.0), m.METRICS: old}), reply_to=sent[1])], {}, seconds=0.1)
    assert unknown["classes"] is None
    other = copy.deepcopy(history)
    other.add({**rec, "classes": {"labels": [8], "predicted": [8], "right": [6]}})
    history.add(unknown)
    for h in (history, other):
        assert h.classes is None and run_summary(load(), h)["balanced_accuracy"] is None
    # A round with no samples (all failed) leaves the tally as it was.
    empty = History()
    empty.add(round_record(3, sent, [], {}, seconds=0.1))
    empty.add(rec)
    assert empty.classes == [3, 5, 3, 5, 2, 4]


def test_a_history_from_an_older_checkpoint_loads_with_its_rounds_aggregated() -> None:
    history = History(rounds=5, seen=40)
    old = dict(history.__dict__)
    for since in ("aggregated", "errors", "shared_ids", "no_change_correct",
                  "majority_correct", "classes"):  # fields added since
        del old[since]
    restored = History.__new__(History)
    restored.__setstate__(old)
    assert restored.aggregated == 5 and restored.errors == {} and restored.seen == 40
    assert restored.shared_ids == set()
    # Its rounds' trivial predictors were never counted: unknown, not zero.
    assert restored.no_change_correct is None
    restored.add(round_record(6, [], [], {}, seconds=0.1))
    assert run_summary(load(), restored)["kappa_temporal"] is None
    assert restored.classes is None and run_summary(load(), restored)["per_class"] is None
    assert pickle.loads(pickle.dumps(history)) == history  # today's checkpoints unchanged


def test_roster_orders_by_client_and_learns_from_reports() -> None:
    roster = Roster()
    roster.learn([_reply(_sent(900), 1.0, 1, 2), _reply(_sent(5), 1.0, 1, 0)])
    assert roster.ordered([5, 77, 900, 3]) == [5, 900, 3, 77]  # known by client, then unknown


def test_summary_and_metrics_files_hold_no_nan(tmp_path: Path) -> None:
    # JSON has no NaN: strict readers (JavaScript's JSON.parse) refuse the file outright.
    write_summary(tmp_path, {"global_eval": {"accuracy": math.nan}, "rounds": [1.0, math.inf]})
    MetricsLog(tmp_path / "metrics.jsonl").write({"accuracy": math.nan})
    strict = {"parse_constant": lambda name: pytest.fail(f"{name} in the file")}
    summary = json.loads((tmp_path / "summary.json").read_text(), **strict)
    assert summary == {"global_eval": {"accuracy": None}, "rounds": [1.0, None]}
    assert json.loads((tmp_path / "metrics.jsonl").read_text(), **strict) == {"accuracy": None}


def test_a_resumed_log_drops_the_half_line_a_crash_left(tmp_path: Path) -> None:
    # kill -9 in the middle of a large record: the server resumes and appends after it.
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1, "examples": 10, "correct": 5}\n{"round": 2, "exam')
    MetricsLog(path, append=True).write({"round": 2, "examples": 10, "correct": 7})
    assert [r["round"] for r in read_metrics(path)] == [1, 2]
    assert records.federated_series(read_metrics(path)).per_round == [0.5, 0.7]
    MetricsLog(path, append=True)  # a whole file is left as it is
    assert len(read_metrics(path)) == 2


def test_a_record_the_disk_has_no_room_for_leaves_no_half_line(tmp_path: Path) -> None:
    # A file-size limit fails the write as a full disk does (EFBIG for ENOSPC), for real.
    path = tmp_path / "metrics.jsonl"
    script = (
        "import resource, signal, sys\n"
        "from fedstream.server.records import MetricsLog\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))\n"
        f"log = MetricsLog(__import__('pathlib').Path({str(path)!r}))\n"
        "for r in range(1, 100):\n"
        "    try:\n"
        "        log.write({'round': r, 'examples': 10, 'note': 'x' * 60})\n"
        "    except OSError as err:\n"
        "        print(err); sys.exit(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 3, proc.stderr
    kept = read_metrics(path)
    assert path.read_bytes().endswith(b"\n") and kept
    assert f"{path}: round {len(kept) + 1} could not be recorded" in proc.stdout
    assert "the rounds before it are kept" in proc.stdout
    with path.open("a") as fh:  # a half line a crash left: the reader skips it
        fh.write('{"round": 99, "ex')
    assert read_metrics(path) == kept


def test_a_results_folder_removed_during_the_run_is_said_so(tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "runs" / "mid"
    log = MetricsLog(out / "metrics.jsonl")
    log.write({"round": 1})
    shutil.rmtree(out)
    with pytest.raises(records.ResultsFolderGone, match=r"mid: the results folder was removed "
                       r"or moved during the run; round 2 and later are not recorded"):
        log.write({"round": 2})


@pytest.fixture
def fresh_run():
    stopping.start()
    yield
    stopping.start()  # later tests run as a new run would


def test_no_round_record_is_written_once_the_command_is_stopped(
    tmp_path: Path, fresh_run: None
) -> None:
    # Ctrl-C prints where the rounds end; a round the ServerApp's thread finishes while
    # Ray shuts down must not land after that.
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"round": 1})
    records.stop_logs()
    log.write({"round": 2})
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"round": 1}]
    assert read_metrics(tmp_path) == [{"round": 1}]  # the results folder names it too


def test_a_stopped_run_stops_waiting_for_replies(fresh_run: None) -> None:
    # The ServerApp's thread outlives a Ctrl-C in the simulation engine: waiting out a
    # round's timeout there would keep a Python script from ending.
    import threading
    import time

    from loopback_grid import LoopbackGrid

    from fedstream.server.grid import send_and_collect
    from fedstream.sim.client_app import sim_client_app

    cfg = load(overrides=["federation.clients=2"])
    grid = LoopbackGrid(sim_client_app(cfg), 2, tamper=lambda _node, _reply: None)  # silent
    query = Message(m.roster_query(), dst_node_id=1000, message_type=MessageType.QUERY)
    threading.Timer(0.2, stopping.request).start()
    started = time.monotonic()
    with pytest.raises(stopping.RunStopped):
        send_and_collect(grid, [query], timeout=600)
    assert time.monotonic() - started < 60


def test_a_ray_workers_failure_is_recorded_as_the_exception_that_started_it() -> None:
    from flwr.app import Metadata
    from flwr.app.message import make_message

    from fedstream.server.records import error_reason

    raw = (
        "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor"
        ".run()\x1b[39m (pid=29439, actor_id=df4f)\n  File \"/x/availability.py\", line 38, in mod"
        "\n    raise ClientUnavailable(msg)\nfedstream.sim.availability.ClientUnavailable: client"
        " 0 is offline in round 2\n\nThe above exception was the direct cause of the following"
        " exception:\n\nflwr.clientapp.client_app.ClientAppException: \nException "
        "ClientAppException occurred. Message: client 0 is offline in round 2'>"
    )
    meta = Metadata(run_id=1, message_id="", src_node_id=5, dst_node_id=1,
                    reply_to_message_id="m", group_id="", created_at=0.0, ttl=0,
                    message_type="train")
    reply = make_message(metadata=meta, error=Error(code=0, reason=raw))
    assert error_reason(reply) == "ClientUnavailable: client 0 is offline in round 2"
    plain = make_message(metadata=meta, error=Error(code=0, reason="no reply before timeout"))
    assert error_reason(plain) == "no reply before timeout"
    # A SuperNode's ClientApp error, as a deployed server receives it.
    deployed = ("<class 'fedstream.client.spool.SpoolError'>:<'/d/spool.db: the spool stores "
                "samples of 5 features, opened with n_features=4'>")
    reply = make_message(metadata=meta, error=Error(code=0, reason=deployed))
    assert error_reason(reply) == ("SpoolError: /d/spool.db: the spool stores samples of 5 "
                                   "features, opened with n_features=4")
    # A worker that cannot even build the ClientApp: the message's indented lines are the
    # cause, the traceback's are not.
    unbuilt = (
        "<class 'ray.exceptions.RayTaskError(RaySystemError)'>:<'ray::ClientAppActor.run() "
        "(pid=5027)\n  At least one of the input arguments for this task could not be "
        "computed:\nray.exceptions.RaySystemError: System error: invalid config:\n  "
        "stream.path: file not found: /d/v.csv\ntraceback: Traceback (most recent call "
        "last):\n          ^^^^^^^\n  File \"/x/config.py\", line 640, in validate\n    raise "
        "ConfigError(_format_errors(err)) from None\nfedstream.protocol.config.ConfigError: "
        "invalid config:\n  stream.path: file not found: /d/v.csv'>"
    )
    reply = make_message(metadata=meta, error=Error(code=0, reason=unbuilt))
    typed = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::run()\n"
             "TypeError: expected a list, got <class 'dict'>'>")
    assert error_reason(make_message(metadata=meta, error=Error(code=0, reason=typed))) == (
        "TypeError: expected a list, got <class 'dict'>")
    assert error_reason(reply) == ("RaySystemError: System error: invalid config: stream.path: "
                                   "file not found: /d/v.csv")


def test_a_round_a_device_fails_is_said_in_its_log(capsys):
    # `fedstream client` reads the SuperNode's log, and tells the operator.
    from fedstream.client.device_app import said_on_failure
    from fedstream.protocol.runtime import ROUND_FAILED

    def failing(_msg, _ctx):
        raise ValueError("the spool stores samples of 5 features")

    with pytest.raises(ValueError):
        said_on_failure(None, None, failing)  # type: ignore[arg-type]
    assert capsys.readouterr().err == (
        f"{ROUND_FAILED} ValueError: the spool stores samples of 5 features\n")


def test_updates_that_carried_no_samples_are_counted_apart(tmp_path: Path) -> None:
    # 3 clients and 12 rows at 2 a round: from round 3 on the clients have nothing new.
    from loopback_grid import LoopbackGrid

    from fedstream.server.app import run_federation
    from fedstream.sim.client_app import sim_client_app
    from fedstream.sim.federation import federation

    data = tmp_path / "tiny.csv"
    data.write_text("a,b,label\n" + "".join(f"{i},{-i},{i % 2}\n" for i in range(12)))
    cfg = load(None, ["federation.clients=3", "federation.rounds=4", "output.progress=false",
                      "federation.round_timeout=5", 'stream.source="csv"',
                      f'stream.path="{data}"', 'stream.arrival="fixed"', "stream.rate=2",
                      'partition.scheme="iid"'])
    grid = LoopbackGrid(sim_client_app(cfg), 3)
    _, history = run_federation(grid, cfg, federation(cfg).initial_arrays(), tmp_path / "out")
    summary = records.run_summary(cfg, history)
    assert summary["client_updates"] == 12 and summary["samples_seen"] == 12
    rounds = records.read_metrics(tmp_path / "out" / "metrics.jsonl")
    empty = sum(rep["examples"] == 0 for r in rounds for rep in r["clients"].values())
    assert summary["client_updates_empty"] == empty >= 4  # rounds 3 and 4, at least
    # Under secure aggregation the server cannot tell: not 0, unknown.
    secure = cfg.model_copy(update={"secure_aggregation": cfg.secure_aggregation.model_copy(
        update={"enabled": True})})
    _, history = run_federation(LoopbackGrid(sim_client_app(secure), 3), secure,
                                federation(secure).initial_arrays(), tmp_path / "secure")
    assert records.run_summary(secure, history)["client_updates_empty"] is None


def test_the_operator_sees_a_line_a_round_as_the_server_writes_them(tmp_path, capsys):
    import json

    from fedstream.server.aggregator import RoundLines

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"round": 1, "clients_sampled": 3, "clients_ok": 3,
                                   "aggregated": True, "accuracy": 0.5, "seconds": 1.0}) + "\n")
    lines = RoundLines(metrics, rounds=4)  # a resume: what was there is not said again
    with metrics.open("a") as fh:
        fh.write(json.dumps({"resumed_after_round": 1}) + "\n")
        fh.write(json.dumps({
            "round": 2, "clients_sampled": 3, "clients_ok": 1, "aggregated": False,
            "aggregation_error": "secure aggregation failed: 1 client(s) ready", "seconds": 20.0,
            "failures": [{"client": 2, "node": 9, "reason": "no reply before timeout"},
                         {"client": None, "node": 7, "reason": "no reply before timeout"}],
        }) + "\n")
        fh.write('{"round": 3, "clients_')  # still being written: said once it is whole
    lines.say_new()
    said = capsys.readouterr().err.splitlines()
    assert said == [
        "round 2/4: 1 of 3 devices, not aggregated (secure aggregation failed: 1 client(s) "
        "ready); 2 failed, first client 2: no reply before timeout, 20.0 s"]
    with metrics.open("a") as fh:
        fh.write('sampled": 3, "clients_ok": 3, "accuracy": 0.75, "seconds": 2.5}\n')
    lines.say_new()
    said = capsys.readouterr().err
    assert said == "round 3/4: 3 of 3 devices, aggregated, accuracy 75.0 %, 2.5 s\n"


def test_the_summary_names_the_flower_strategy_that_ran():
    from fedstream.server.strategy import flower_strategy, make_strategy

    for overrides, name in [
        ([], "FedAvgM"),  # fedavg with its own server step of 3
        (["federation.server_lr=1.0"], "FedAvg"),
        (["federation.server_lr=1.0", "federation.server_momentum=0.9"], "FedAvgM"),
        (["federation.strategy=fedadam"], "FedAdam"),
        (["federation.strategy=fedyogi"], "FedYogi"),
    ]:
        cfg = load(None, overrides)
        assert flower_strategy(cfg) == name
        assert name in [k.__name__ for k in type(make_strategy(cfg)).__mro__]


def test_the_progress_bar_does_not_redraw_after_a_stop(
    tmp_path: Path, fresh_run: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # Ctrl-C prints where the rounds end; a round finishing after it must not draw the
    # bar again below that line.
    from loopback_grid import LoopbackGrid

    from fedstream.server.app import run_federation
    from fedstream.sim.client_app import sim_client_app
    from fedstream.sim.federation import federation

    cfg = load(None, ["federation.clients=2", "federation.rounds=3", "output.progress=true"])
    grid = LoopbackGrid(sim_client_app(cfg), 2)

    def stop_in_round_2(rec: dict, _history: object) -> None:
        if rec["round"] == 2:
            records.stop_logs()  # as the Ctrl-C handler does, while round 2 ends

    with contextlib.suppress(stopping.RunStopped):
        run_federation(grid, cfg, federation(cfg).initial_arrays(), tmp_path / "out",
                       on_round=stop_in_round_2)
    drawn = capsys.readouterr().err
    assert "1/3" in drawn and "2/3" not in drawn and "3/3" not in drawn


def test_a_server_with_too_few_device_keys_for_a_round_says_so() -> None:
    from fedstream.protocol.config import least_clients
    from fedstream.server.aggregator import check_enough_nodes, waiting_line

    cfg = load(None, ["federation.clients=3", "federation.min_clients=3"])
    need = least_clients(cfg.federation, cfg.secure_aggregation)
    assert need == 3
    with pytest.raises(ValueError, match=r"2 device keys registered, but a round waits for 3 "
                       r"devices \(federation.min_clients\): no round could start"):
        check_enough_nodes(2, need, cfg)
    check_enough_nodes(3, need, cfg)
    # Secure aggregation: a sum needs two devices, whatever min_clients says.
    secure = load(None, ["federation.clients=3", "secure_aggregation.enabled=true"])
    with pytest.raises(ValueError, match="1 device key registered, but a round waits for 2"):
        check_enough_nodes(1, least_clients(secure.federation, secure.secure_aggregation),
                           secure)
    # The terminal hears when too few are connected, and when enough are again; once each.
    assert waiting_line(3, 3, 3) is None
    assert waiting_line(1, 3, 3) == ("waiting for devices: 1 of the 3 a round needs are "
                                     "connected (a device's own terminal says why it is not)")
    assert waiting_line(1, 3, 1) is None
    assert waiting_line(2, 3, 1).startswith("waiting for devices: 2 of the 3")
    assert waiting_line(3, 3, 2) == "3 devices connected: rounds go on"


def test_a_deployment_whose_class_names_do_not_fit_its_classes_is_refused(
    tmp_path: Path,
) -> None:
    from fedstream.server.aggregator import Aggregator, serve

    # A file source's names are checked against the file in a simulation, not against
    # n_classes; a server, whose devices' samples have n_classes, checks them before it
    # starts anything (model.pt would name 3 of 10 outputs, and not load).
    (tmp_path / "d.csv").write_text("a,label\n1,x\n2,y\n")
    cfg = load(None, [f'stream.path="{tmp_path / "d.csv"}"', "stream.n_classes=10",
                      'stream.classes=["x", "y", "z"]'])
    with pytest.raises(ValueError, match=r"stream.classes names 3 classes, but the devices' "
                       r"samples have stream.n_classes = 10"):
        serve(Aggregator(tmp_path / "state", tmp_path / "creds", "127.0.0.1", 1), cfg, [], False)
    assert not (tmp_path / "state").exists()
