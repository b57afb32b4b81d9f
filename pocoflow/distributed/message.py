"""The step message: ids only, JSON only (G7).

A message carries no code and no Store, only which step of which run to execute, so a
message from a stranger can at worst ask a worker to run a registered flow's step that
the ledger already knows about. ``v`` versions the layout; fields added later get
defaults so a message queued by an older client still decodes.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar

MESSAGE_VERSION = 1


class MalformedMessage(ValueError):
    """A step message that cannot be decoded; the text names the bad field."""

    def __init__(self, message: str, *, run_id: str | None = None) -> None:
        super().__init__(message)
        #: The run id when it was readable, so the error can be recorded on the run.
        self.run_id = run_id


class _Message:
    """What every message kind shares: types checked at construction, a flat dict out,
    a forgiving decode in (unknown keys ignored, defaults for missing ones)."""

    KIND: ClassVar[str] = "message"

    def __post_init__(self) -> None:
        _check_types(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        # Flat fields: a plain dict, not asdict()'s recursive deepcopy (every step pays it).
        return {name: getattr(self, name) for name in _field_names(type(self))}

    @classmethod
    def from_dict(cls, data: Any) -> Any:
        """Decode a message body; raise ``MalformedMessage`` naming the first bad field.

        Unknown keys are ignored (a newer client may add fields an older worker does not
        need); missing keys with defaults take them.
        """
        return _decode(cls, data, cls.KIND)


@dataclass(frozen=True)
class StepMessage(_Message):
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
    KIND: ClassVar[str] = "step message"

    @classmethod
    def from_dict(cls, data: Any) -> StepMessage:
        return _decode(cls, data, cls.KIND)  # type: ignore[no-any-return]

    def retry(self, try_number: int, attempt: int) -> StepMessage:
        """The message for the next ``exec`` try of this step, under a new attempt."""
        return StepMessage(
            self.run_id, self.flow, self.step, self.node_id, attempt, try_number, self.v
        )


@dataclass(frozen=True)
class ItemMessage(_Message):
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
    KIND: ClassVar[str] = "item message"

    @classmethod
    def from_dict(cls, data: Any) -> ItemMessage:
        return _decode(cls, data, cls.KIND)  # type: ignore[no-any-return]

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
#: The ledger's integer columns hold 32 bits (PostgreSQL ``integer``): a larger number is no
#: step, and would make every lookup of it raise instead of miss.
_INT_MAX = 2**31 - 1
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
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or not minimum <= value <= _INT_MAX
        ):
            raise MalformedMessage(
                f"step message field {name!r} must be an int from {minimum} to {_INT_MAX}, "
                f"got {value!r}"
            )


_FIELD_NAMES: dict[str, tuple[str, ...]] = {}


def _field_names(cls: Any) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls.KIND)
    if names is None:
        names = _FIELD_NAMES[cls.KIND] = tuple(f.name for f in fields(cls))
    return names
