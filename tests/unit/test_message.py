"""The step message: JSON only, ids only, every bad field named, old messages still
decode (G7)."""

from __future__ import annotations

import json

import pytest

from pocoflow.distributed.message import MESSAGE_VERSION, MalformedMessage, StepMessage

pytestmark = pytest.mark.unit

GOOD = {"run_id": "r-1", "flow": "f", "step": 3, "node_id": "n#2", "attempt": 2}


def test_round_trips_through_json() -> None:
    message = StepMessage("r-1", "f", 3, "n#2", 2, try_number=4)
    body = json.loads(json.dumps(message.to_dict()))
    assert StepMessage.from_dict(body) == message
    assert body == {**GOOD, "try_number": 4, "v": MESSAGE_VERSION}


def test_is_frozen() -> None:
    message = StepMessage.from_dict(GOOD)
    with pytest.raises(AttributeError):
        message.step = 4  # type: ignore[misc]


def test_a_message_without_newer_fields_takes_their_defaults() -> None:
    message = StepMessage.from_dict(GOOD)  # as a client before try_number/v sent it
    assert message.try_number == 1 and message.v == MESSAGE_VERSION


def test_unknown_fields_from_a_newer_client_are_ignored() -> None:
    assert StepMessage.from_dict({**GOOD, "priority": 9}) == StepMessage.from_dict(GOOD)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("run_id", ""),
        ("run_id", 7),
        ("flow", None),
        ("node_id", ["n"]),
        ("step", "3"),
        ("step", -1),
        ("step", True),
        ("step", 2.0),
        ("attempt", 0),
        ("try_number", 0),
        ("v", "1"),
    ],
)
def test_a_bad_field_is_named(field: str, value: object) -> None:
    with pytest.raises(MalformedMessage, match=repr(field)):
        StepMessage.from_dict({**GOOD, field: value})


@pytest.mark.parametrize("field", ["run_id", "flow", "step", "node_id", "attempt"])
def test_a_missing_field_is_named(field: str) -> None:
    body = {k: v for k, v in GOOD.items() if k != field}
    with pytest.raises(MalformedMessage, match=f"lacks field {field!r}"):
        StepMessage.from_dict(body)


def test_the_run_id_travels_with_the_error_when_readable() -> None:
    with pytest.raises(MalformedMessage) as bad:
        StepMessage.from_dict({**GOOD, "step": "x"})
    assert bad.value.run_id == "r-1"
    with pytest.raises(MalformedMessage) as worse:
        StepMessage.from_dict({**GOOD, "run_id": 5})
    assert worse.value.run_id is None


@pytest.mark.parametrize("body", [None, "text", ["r-1", "f", 0, "n", 1], 3])
def test_a_body_that_is_not_an_object(body: object) -> None:
    with pytest.raises(MalformedMessage, match="JSON object"):
        StepMessage.from_dict(body)


def test_retry_keeps_the_step_and_bumps_try_and_attempt() -> None:
    again = StepMessage.from_dict(GOOD).retry(try_number=2, attempt=3)
    assert (again.run_id, again.step, again.node_id) == ("r-1", 3, "n#2")
    assert (again.try_number, again.attempt) == (2, 3)


def test_item_message_round_trips_and_names_bad_fields() -> None:
    from pocoflow.distributed.message import ItemMessage

    msg = ItemMessage("r", "f", 2, "n", 7, 3, 2)
    assert ItemMessage.from_dict(msg.to_dict()) == msg
    assert msg.key == ("r", 2, 7, 3)
    assert msg.retry(3, 4) == ItemMessage("r", "f", 2, "n", 7, 4, 3)
    with pytest.raises(MalformedMessage, match="'idx'") as bad:
        ItemMessage.from_dict({**msg.to_dict(), "idx": -1})
    assert bad.value.run_id == "r"
    with pytest.raises(MalformedMessage, match="item message lacks field 'idx'"):
        ItemMessage.from_dict({k: v for k, v in msg.to_dict().items() if k != "idx"})
