"""The step message: ids only, JSON only (G7).

A message carries no code and no Store, only which step of which run to execute, so a
message from a stranger can at worst ask a worker to run a registered flow's step that
the ledger already knows about. ``v`` versions the layout; fields added later get
defaults so a message queued by an older client still decodes.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any

MESSAGE_VERSION = 1


class MalformedMessage(ValueError):
    """A step message that cannot be decoded; the text names the bad field."""

    def __init__(self, message: str, *, run_id: str | None = None) -> None:
        super().__init__(message)
        #: The run id when it was readable, so the error can be recorded on the run.
        self.run_id = run_id


@dataclass(frozen=True)
class StepMessage:
    """Run step ``step`` (node ``node_id``) of ``run_id`` as fencing ``attempt``.

    ``try_number`` counts ``exec`` tries of a node with ``max_retries`` (1 on the first);
    ``attempt`` is the ledger's fencing token for the step (G1): a message whose attempt
    the ledger no longer holds is stale and does nothing.
    """

    run_id: str
    flow: str
    step: int
    node_id: str
    attempt: int
    try_number: int = 1
    v: int = MESSAGE_VERSION

    def __post_init__(self) -> None:
        _check_types(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        # Flat fields: a plain dict, not asdict()'s recursive deepcopy (every step pays it).
        return {name: getattr(self, name) for name in _FIELD_NAMES}

    @classmethod
    def from_dict(cls, data: Any) -> StepMessage:
        """Decode a message body; raise ``MalformedMessage`` naming the first bad field.

        Unknown keys are ignored (a newer client may add fields an older worker does not
        need); missing keys with defaults take them.
        """
        return _decode(cls, data, "step message")

    def retry(self, try_number: int, attempt: int) -> StepMessage:
        """The message for the next ``exec`` try of this step, under a new attempt."""
        return StepMessage(
            self.run_id, self.flow, self.step, self.node_id, attempt, try_number, self.v
        )


@dataclass(frozen=True)
class ItemMessage:
    """Run item ``idx`` of map step ``step`` (node ``node_id``) of ``run_id`` as the
    item's fencing ``attempt``, ``exec`` try ``try_number``: ids only, as a step message.
    The item's value comes from the ledger (``pf_items``), never from the message."""

    run_id: str
    flow: str
    step: int
    node_id: str
    idx: int
    attempt: int
    try_number: int = 1
    v: int = MESSAGE_VERSION

    def __post_init__(self) -> None:
        _check_types(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _ITEM_FIELD_NAMES}

    @classmethod
    def from_dict(cls, data: Any) -> ItemMessage:
        """Decode a message body; raise ``MalformedMessage`` naming the first bad field."""
        return _decode(cls, data, "item message")

    @property
    def key(self) -> tuple[str, int, int, int]:
        """``(run_id, step, idx, attempt)``: what the ledger's item rows are fenced on."""
        return (self.run_id, self.step, self.idx, self.attempt)

    def retry(self, try_number: int, attempt: int) -> ItemMessage:
        return ItemMessage(
            self.run_id, self.flow, self.step, self.node_id, self.idx, attempt, try_number
        )


def _decode(cls: Any, data: Any, what: str) -> Any:
    if not isinstance(data, dict):
        raise MalformedMessage(f"{what} must be a JSON object, got {type(data).__name__}")
    run_id = data.get("run_id") if isinstance(data.get("run_id"), str) else None
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in data:
            values[f.name] = data[f.name]
        elif f.default is MISSING:
            raise MalformedMessage(f"{what} lacks field {f.name!r}", run_id=run_id)
    try:
        return cls(**values)
    except MalformedMessage as error:
        raise MalformedMessage(str(error), run_id=run_id) from None


_INT_FIELDS = {"step": 0, "idx": 0, "attempt": 1, "try_number": 1, "v": 1}  # field -> minimum
_STR_FIELDS = ("run_id", "flow", "node_id")


def _check_types(values: dict[str, Any]) -> None:
    for name in _STR_FIELDS:
        value = values[name]
        if not isinstance(value, str) or not value:
            raise MalformedMessage(
                f"step message field {name!r} must be a non-empty string, got {value!r}"
            )
    for name, minimum in _INT_FIELDS.items():
        if name not in values:  # idx: item messages only
            continue
        value = values[name]
        # bool is an int in Python, but True is never a step number.
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise MalformedMessage(
                f"step message field {name!r} must be an int >= {minimum}, got {value!r}"
            )


_FIELD_NAMES = tuple(f.name for f in fields(StepMessage))
_ITEM_FIELD_NAMES = tuple(f.name for f in fields(ItemMessage))
