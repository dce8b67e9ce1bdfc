"""Scoring the clients' drift detections against the drifts the simulation put in."""

from __future__ import annotations

from typing import Any

import pytest

from fedstream.protocol.config import load
from fedstream.sim.detection import client_drift_times, detection_report, drifts_in_run
from fedstream.sim.federation import federation

# 10 samples a round on every client, evenly: drift at time 5 starts at position 50.
STEADY = ["stream.arrival=fixed", "stream.rate=10", "stream.rate_spread=0",
          "federation.clients=2", "federation.rounds=15", "drift.stagger=0"]


def rec(round_: int, offsets: dict[int, int], drifts: tuple[tuple[int, int], ...] = ()) -> dict:
    return {"round": round_, "drifts": [{"client": c, "position": p} for c, p in drifts],
            "clients": {str(c): {"offset": o} for c, o in offsets.items()}}


def report(overrides: list[str], records: list[dict]) -> dict[str, Any]:
    result = detection_report(load(overrides=[*STEADY, *overrides]), records)
    assert result is not None
    return result


def test_first_detection_after_a_drift_counts_and_every_other_is_a_false_alarm() -> None:
    records = [
        rec(3, {0: 30}, ((0, 25),)),  # before any drift: a false alarm
        rec(6, {0: 60, 1: 40}, ((0, 57), (0, 59))),  # drift 1 found 7 samples in; a repeat
        rec(15, {0: 150}),  # drift 2 (position 100) reached, never found: missed
    ]
    r = report(["drift.at=[5.0, 10.0]"], records)
    assert (r["client_drifts"], r["detected"], r["missed"], r["false_alarms"]) == (2, 1, 1, 2)
    assert r["delay_samples"] == {"median": 7.0, "mean": 7.0, "max": 7.0}
    assert r["delay_rounds"]["median"] == 1.0  # from time 5 to the end of round 6
    first, second = r["per_drift"]
    assert (first["at"], first["clients_reached"], first["detected"]) == (5.0, 1, 1)
    assert (second["clients_reached"], second["missed"], second["delay_samples"]) == (1, 1, None)


def test_a_drift_the_client_never_reached_is_not_missed() -> None:
    # Client 1 stopped at position 40 (not sampled again): drift 1 starts at 50.
    r = report(["drift.at=[5.0]"], [rec(4, {0: 40, 1: 40}), rec(8, {0: 80}, ((0, 62),))])
    assert (r["client_drifts"], r["detected"], r["missed"]) == (1, 1, 0)


def test_a_detection_after_the_next_drift_belongs_to_the_next() -> None:
    r = report(["drift.at=[5.0, 7.0]"], [rec(10, {0: 100}, ((0, 75),))])
    assert (r["detected"], r["missed"], r["false_alarms"]) == (1, 1, 0)
    assert [d["detected"] for d in r["per_drift"]] == [0, 1]
    assert r["delay_samples"]["median"] == 5.0


def test_a_gradual_drift_starts_at_the_start_of_its_ramp() -> None:
    # at 5, width 2: the ramp starts at time 4, position 40; a detection at 45 is early
    # for the midpoint but not a false alarm.
    r = report(["drift.kind=gradual", "drift.at=[5.0]", "drift.width=2"],
               [rec(6, {0: 60}, ((0, 45),))])
    assert (r["detected"], r["false_alarms"]) == (1, 0)
    assert r["delay_samples"]["median"] == 5.0


def test_without_drift_every_detection_is_a_false_alarm() -> None:
    r = report(["drift.kind=none"], [rec(5, {0: 50, 1: 50}, ((0, 10), (1, 30)))])
    assert (r["client_drifts"], r["false_alarms"], r["alarms"], r["per_drift"]) == (0, 2, 2, [])


def test_on_a_file_without_drift_put_in_no_alarm_is_called_false(tmp_path) -> None:
    data = tmp_path / "d.csv"
    data.write_text("a,label\n" + "".join(f"{i % 7},{i % 2}\n" for i in range(40)))
    r = report(["drift.kind=none", "stream.source=csv", f'stream.path="{data}"'],
               [rec(5, {0: 50, 1: 50}, ((0, 10), (1, 30)))])
    assert (r["false_alarms"], r["alarms"], r["per_drift"]) == (None, 2, [])


def test_nothing_to_score_without_a_detector_or_under_secure_aggregation() -> None:
    records = [rec(6, {0: 60}, ((0, 55),))]
    for extra in (["detector.kind=none"], ["secure_aggregation.enabled=true"]):
        assert detection_report(load(overrides=[*STEADY, *extra]), records) is None


def test_staggered_times_are_the_ones_the_sources_use() -> None:
    cfg = load(overrides=["federation.clients=5", "drift.at=[10.0, 20.0]", "drift.stagger=3"])
    times = client_drift_times(cfg)
    for client, own in enumerate(times):
        assert federation(cfg).source(client).drift.at == tuple(own)
        assert own[1] - own[0] == pytest.approx(10.0)  # one offset per client keeps gaps
    assert len({own[0] for own in times}) == 5


def test_a_stream_that_begins_in_the_new_concept_saw_no_drift() -> None:
    # drift at 0 (or staggered below 0): the client's first sample is of the new concept,
    # so a later detection is a false alarm, and nothing is missed.
    r = report(["drift.at=[0.0]"], [rec(10, {0: 100}, ((0, 80),))])
    assert (r["client_drifts"], r["missed"], r["false_alarms"]) == (0, 0, 1)
    staggered = load(overrides=[*STEADY, "drift.at=[1.0, 2.0]", "drift.stagger=3",
                                "federation.clients=4"])
    times = client_drift_times(staggered)
    assert any(t <= 0 for own in times for t in own)  # seed 0 puts some before time 0
    r = detection_report(staggered, [rec(5, dict.fromkeys(range(4), 100))])
    assert r is not None
    assert r["client_drifts"] == r["missed"] == sum(t > 0 for own in times for t in own)


def test_a_ramp_that_starts_before_the_stream_is_still_seen() -> None:
    # A ramp from -0.5 to 3.5: the first samples are mostly of the old concept, so the
    # client lives through the change; its window starts at its first sample.
    r = report(["drift.kind=gradual", "drift.width=4", "drift.at=[1.5]"],
               [rec(10, {0: 100}, ((0, 25),))])
    assert (r["client_drifts"], r["detected"], r["false_alarms"]) == (1, 1, 0)
    assert r["delay_samples"]["median"] == 25.0


def test_two_drifts_with_no_sample_between_are_one_change() -> None:
    # One sample a round: nothing arrives between times 5.2 and 5.6, so both drifts start
    # at position 6; the change is scored once, as the later drift.
    r = report(["stream.rate=1", "drift.at=[5.2, 5.6]"], [rec(10, {0: 10}, ((0, 7),))])
    assert (r["client_drifts"], r["detected"], r["missed"]) == (1, 1, 0)
    assert [d["clients_reached"] for d in r["per_drift"]] == [0, 1]


def test_overlapping_ramps_split_halfway_between_their_times() -> None:
    # Ramps of 6 rounds at 10 and 11 overlap from 8 to 13: a detection at time 10 (the
    # first drift's midpoint) is the first drift's, not the second's.
    r = report(["drift.kind=gradual", "drift.at=[10.0, 11.0]", "drift.width=6"],
               [rec(12, {0: 120}, ((0, 100),))])
    assert [d["detected"] for d in r["per_drift"]] == [1, 0]
    assert r["per_drift"][1]["missed"] == 1


def test_a_drift_beyond_the_run_is_not_counted_up_to() -> None:
    # Poisson arrivals are counted round by round: scoring a drift at 10^6 used to count
    # every client's arrivals up to it (20 s), though no client can reach it in the run.
    cfg = load(overrides=["drift.at=[5.0, 1000000.0]", "stream.arrival=poisson"])
    r = detection_report(cfg, [rec(15, dict.fromkeys(range(20), 400))])
    assert r is not None and r["per_drift"][1]["clients_reached"] == 0
    assert r["per_drift"][0]["clients_reached"] == 20
    counted = federation(cfg).stream(0).arrival._cum.size - 1  # rounds counted so far
    assert counted < 1000


def test_the_drifts_in_a_run_are_those_some_client_meets() -> None:
    # The summary's drift_times and the file-drift note: a drift whose base time is past
    # the end still counts when a client's stagger brings it inside, and one before time 0
    # for every client does not.
    cfg = load(overrides=["federation.rounds=10", "drift.at=[0.5, 4.0, 10.5, 40.0]",
                          "drift.stagger=1"])
    times = client_drift_times(cfg)
    assert any(own[0] > 0 for own in times)  # some clients meet 0.5 after time 0: kept
    assert any(own[2] < 10 for own in times)  # seed 0 shifts some client's 10.5 inside
    assert drifts_in_run(cfg) == [0.5, 4.0, 10.5]
    early = load(overrides=["federation.rounds=10", "drift.at=[0.0, 4.0]", "drift.stagger=0"])
    assert drifts_in_run(early) == [4.0]  # at 0, every stream begins in the new concept
    assert drifts_in_run(load(overrides=["federation.rounds=10", "drift.at=[10.5]",
                                         "drift.stagger=0"])) == []
    ramp = load(overrides=["federation.rounds=10", "drift.at=[11.0]", "drift.stagger=0",
                           "drift.kind=gradual", "drift.width=4"])
    assert drifts_in_run(ramp) == [11.0]  # its ramp starts at 9, inside the run
