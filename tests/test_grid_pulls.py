"""Replies whose upload was cut off: bounded waits, and charged to the right device."""

from __future__ import annotations

import time

import pytest
from flwr.app import Error, Metadata, RecordDict
from flwr.app.message import make_message
from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, ObjectUnavailableError

from fedstream.server import grid as fgrid


def test_a_reply_whose_parts_never_come_is_given_up_when_the_trip_ends() -> None:
    # The SuperLink knows the reply but not all of its parts (the device died while
    # uploading). Flower would retry for two hours; a trip with 0.5 s left gives up in
    # about the grace after it.
    def never(object_id: str) -> bytes:
        raise ObjectUnavailableError(object_id)

    began = time.monotonic()
    with fgrid._pulls_until(began + 0.5), pytest.raises(ObjectPullError):
        fgrid._bounded_pull_objects(["a", "b"], never, initial_backoff=0.05, backoff_cap=0.2)
    assert time.monotonic() - began < 0.5 + fgrid.PULL_GRACE + 1.0
    # Outside a trip, Flower's own limits apply (here: its retry count, kept small).
    with pytest.raises(ObjectPullError):
        fgrid._bounded_pull_objects(["a"], never, initial_backoff=0.01, max_tries_per_object=3)


def test_flowers_error_reply_for_a_lost_upload_is_charged_to_the_device() -> None:
    server_node, device, sent_id = 1, 42, "m-7"

    def reply(src: int) -> Metadata:
        return Metadata(
            run_id=3, message_id="", src_node_id=src, dst_node_id=server_node,
            reply_to_message_id=sent_id, group_id="", created_at=time.time(), ttl=0,
            message_type="system",
        )

    lost = make_message(
        metadata=reply(server_node),
        error=Error(code=0, reason="Reply message objects are unavailable."),
    )
    charged = fgrid._charged(lost, {sent_id: device})
    assert charged.metadata.src_node_id == device and charged.error.reason == lost.error.reason
    assert charged.metadata.reply_to_message_id == sent_id
    ok = make_message(metadata=reply(device), content=RecordDict())
    assert fgrid._charged(ok, {sent_id: device}) is ok  # not an error: as it came
