"""What the monitor's control buttons do: cancel, pause, resume, send, fork, each checked
here.

The check lives in the action, not in the page that shows the buttons, because a hidden
button is no protection: anything that reaches ``control_run`` (a crafted rerun, another
page embedding the monitor) is refused unless all three hold: the monitor was started
with ``--allow-control`` (``allow_control=True``), ``POCOFLOW_MONITOR_TOKEN`` is set in
the monitor's environment and the token typed into the page matches it, and the user
confirmed the action.

A fork runs on the workers (``fork_run``), never in the monitor's process, which would
otherwise run the whole flow itself: the monitor needs the workers' broker and the flow
modules (``POCOFLOW_BROKER_URL``, ``POCOFLOW_FLOWS``) in its environment. A fork is not
idempotent as a pause is: its confirmation is a ``Confirmation`` naming what was ticked
(run, step) with a one-time nonce the fork uses up, so one tick makes one fork however
often Apply is clicked.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pocoflow.settings import Settings

__all__ = [
    "ACTIONS",
    "BULK_ACTIONS",
    "BULK_CHOICES",
    "TOKEN_ENV",
    "Confirmation",
    "ControlRefused",
    "Forked",
    "Forks",
    "confirm",
    "confirmed_choice",
    "control_run",
    "control_runs",
    "controls_enabled",
    "fork_from",
    "fork_runs",
    "selection",
    "unsent_warning",
]

TOKEN_ENV = "POCOFLOW_MONITOR_TOKEN"
ACTIONS = ("cancel", "pause", "resume", "send", "fork")
#: The bulk actions ``control_runs`` performs.
BULK_ACTIONS = ("cancel", "pause", "resume")
#: What the bulk control offers: ``BULK_ACTIONS``, and a fork of each run (``fork_runs``).
BULK_CHOICES = (*BULK_ACTIONS, "fork")
BULK_LIMIT = 1000
"""At most this many runs per bulk action: a filter is narrowed, not a ledger emptied."""


class ControlRefused(PermissionError):
    """A control the monitor will not perform; the message says which condition failed."""


@dataclass(frozen=True)
class Confirmation:
    """One tick of a confirmation box: what it confirmed (``choice``, see
    ``confirmed_choice``) and a nonce that the action it confirms uses up."""

    choice: str
    nonce: str


_ISSUED: OrderedDict[str, None] = OrderedDict()
_ISSUED_LOCK = threading.Lock()
_MAX_ISSUED = 10_000
"""Unused nonces kept at most (the oldest are forgotten: a tick left for that long is
ticked again)."""


def confirm(choice: str) -> Confirmation:
    """A fresh confirmation of ``choice``, good for one action (the monitor's process
    keeps its nonce until an action uses it up)."""
    nonce = secrets.token_urlsafe(16)
    with _ISSUED_LOCK:
        _ISSUED[nonce] = None
        while len(_ISSUED) > _MAX_ISSUED:
            _ISSUED.popitem(last=False)
    return Confirmation(choice, nonce)


def _use_up(confirmation: Confirmation) -> None:
    """Spend ``confirmation``'s nonce; ``ControlRefused`` if an action spent it already."""
    with _ISSUED_LOCK:
        if confirmation.nonce not in _ISSUED:
            raise ControlRefused(
                f"This confirmation ({confirmation.choice}) was used already: tick the box "
                "again to do it again"
            )
        del _ISSUED[confirmation.nonce]


def _check_confirmation(
    allow_control: bool,
    token: str,
    confirmed: Confirmation | None,
    choice: str,
    env: Mapping[str, str] | None,
) -> None:
    """``check`` with a confirmation that must name ``choice``, then its nonce spent."""
    named = isinstance(confirmed, Confirmation) and confirmed.choice == choice
    check(allow_control, token, named, env)
    assert confirmed is not None
    _use_up(confirmed)


def controls_enabled(allow_control: bool, env: Mapping[str, str] | None = None) -> bool:
    """Whether the page may offer controls at all (a token must exist to be typed)."""
    return allow_control and bool((env if env is not None else os.environ).get(TOKEN_ENV))


def check(
    allow_control: bool, token: str, confirmed: bool, env: Mapping[str, str] | None = None
) -> None:
    """``ControlRefused`` unless controls are allowed, the token matches and the action
    was confirmed."""
    if not allow_control:
        raise ControlRefused("Controls are off: start the monitor with --allow-control")
    expected = (env if env is not None else os.environ).get(TOKEN_ENV, "")
    if not expected:
        raise ControlRefused(f"Controls need a token: set {TOKEN_ENV} where the monitor runs")
    # Constant-time compare: the token is a password.
    if not hmac.compare_digest(token.encode(), expected.encode()):
        raise ControlRefused("Wrong control token")
    if not confirmed:
        raise ControlRefused("Confirm the action first")


def control_run(
    action: str,
    run_id: str,
    *,
    db_url: str,
    allow_control: bool,
    token: str,
    confirmed: bool | Confirmation | None,
    key: str | None = None,
    value_json: str | None = None,
    from_step: int | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """Perform ``action`` on ``run_id`` after ``check``; returns what was done, in a line.

    Goes through ``attach(run_id).cancel()/pause()/resume()/send()``, as the CLI does, so
    a run on the workers is steered through Redis and the ledger and an in-process run
    through the ledger; ``fork`` is ``fork_from`` (confirmed by a ``Confirmation``).
    ``KeyError`` for an unknown run, ``ValueError`` for bad input.
    """
    if action == "fork":
        check(allow_control, token, isinstance(confirmed, Confirmation), env)  # before all
        forked = fork_from(
            run_id,
            _step(from_step, f"run {run_id!r}"),
            db_url=db_url,
            allow_control=allow_control,
            token=token,
            confirmed=confirmed if isinstance(confirmed, Confirmation) else None,
            env=env,
        )
        return f"run {run_id}: forked from step {from_step} as {forked.run_id}"
    check(allow_control, token, bool(confirmed), env)
    if action not in ACTIONS:
        raise ValueError(f"Unknown action {action!r}: one of {', '.join(ACTIONS)}")
    from pocoflow.distributed.client import attach

    handle = attach(run_id, db_url)
    if action == "send":
        if not key:
            raise ValueError(f"Sending to run {run_id!r} needs a key")
        try:
            value: Any = json.loads(value_json or "null")
        except ValueError as exc:
            raise ValueError(f"The value for {key!r} is not valid JSON: {exc}") from None
        handle.send(key, value)
        return f"run {run_id}: sent {key!r}"
    getattr(handle, action)()
    return f"run {run_id}: {action} requested"


def confirmed_choice(
    action: str | None, from_step: int | None = None, run_id: str | None = None
) -> str | None:
    """What a confirmation tick is bound to: the action, and for a fork its step and run
    (a tick for "fork run x from step 2" does not confirm a fork from step 5, nor of
    another run); a bulk fork's tick (no ``run_id``) names the step."""
    return _fork_choice(from_step, run_id) if action == "fork" else action


def _fork_choice(from_step: int | None, run_id: str | None = None) -> str:
    return f"fork run {run_id} from step {from_step}" if run_id else f"fork from step {from_step}"


def _step(from_step: Any, what: str) -> int:
    if isinstance(from_step, bool) or not isinstance(from_step, int):
        raise ValueError(f"Forking {what} needs a step number, got {from_step!r}")
    return from_step


def fork_from(
    run_id: str,
    from_step: int,
    *,
    db_url: str,
    allow_control: bool,
    token: str,
    confirmed: Confirmation | None,
    env: Mapping[str, str] | None = None,
) -> Forked:
    """Fork ``run_id`` from checkpoint ``from_step`` onto the workers after ``check``,
    with ``confirmed`` naming this run and step (``confirmed_choice``), its nonce used up
    here: the same confirmation twice is refused, so a second click makes no second fork.

    The broker is checked before anything is recorded, as ``pocoflow fork`` does: a fork
    whose first step no broker takes would only wait for a worker's sweeper. ``fork_run``'s
    errors (unknown run, no such checkpoint, nothing after it, an unregistered flow) pass
    through, each naming run and step."""
    _check_confirmation(allow_control, token, confirmed, _fork_choice(from_step, run_id), env)
    from pocoflow.distributed.client import fork_run
    from pocoflow.recorder import open_ledger

    step = _step(from_step, f"run {run_id!r}")
    settings = _reachable_broker(db_url)
    fork_id = fork_run(run_id, step, settings=settings).run_id
    return Forked(fork_id, _sent(open_ledger(db_url), fork_id, step))


def _reachable_broker(db_url: str) -> Settings:
    """The monitor's settings for ``db_url``, if their broker answers; ``ConnectionError``
    saying no fork was recorded otherwise."""
    from pocoflow.doctor import broker_refusal
    from pocoflow.settings import Settings

    settings = Settings.from_env(db_url=db_url)
    refusal = broker_refusal(settings.broker_url, "no fork was recorded")
    if refusal:
        raise ConnectionError(refusal)
    return settings


def _sent(db: Any, fork_id: str, from_step: int) -> bool:
    """Whether the fork's first step was published (the ledger marks it sent then)."""
    step = db.get_step(fork_id, from_step + 1)
    return bool(step and step["sent_at"])


def unsent_warning(fork_ids: list[str]) -> str:
    """What to say of forks recorded whose first step the broker did not take."""
    return (
        f"Recorded but not sent: the first step of {', '.join(fork_ids)} could not be "
        "published to the broker; it waits in the ledger until a worker's sweeper sends it "
        "(check the broker with `pocoflow doctor`)"
    )


@dataclass(frozen=True)
class Forked:
    """A fork made: its run id, and whether its first step reached the broker (if not,
    it waits in the ledger until a worker's sweeper sends it)."""

    run_id: str
    sent: bool


@dataclass
class Forks:
    """What a bulk fork did: ``forked`` parent -> fork, ``skipped`` the runs with no step
    to fork from (why), ``failed`` the forks refused (the error), ``unsent`` the forks
    recorded whose first step the broker did not take."""

    forked: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    unsent: list[str] = field(default_factory=list)


def selection(db: Any, filt: Any) -> tuple[int, str]:
    """``(count, fingerprint)`` of the runs the filter ``filt`` selects now: what a bulk
    confirmation is bound to. The fingerprint hashes the run ids (the first
    ``BULK_LIMIT``), so the same count made of other runs, or another filter, differs."""
    from pocoflow.ui.queries import runs_page

    page = runs_page(db, filt, limit=BULK_LIMIT)
    return page.total, _fingerprint(page.rows)


def _fingerprint(rows: list[dict[str, Any]]) -> str:
    ids = "\n".join(sorted(row["run_id"] for row in rows))
    return hashlib.sha256(ids.encode()).hexdigest()


def control_runs(
    action: str,
    filt: Any,
    *,
    db: Any,
    db_url: str,
    allow_control: bool,
    token: str,
    confirmed: bool,
    expected: int,
    expected_selection: str | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """``action`` on every run the runs-page filter ``filt`` selects, after ``check``:
    ``(done run ids, {run id: error})``. A bulk fork is ``fork_runs``.

    ``expected`` is the count the user saw and confirmed; the filter is counted again here
    and a different count is refused, because runs that started or ended since the page
    was drawn are not what was confirmed. ``expected_selection`` (the fingerprint from
    ``selection`` taken when the user confirmed) also refuses the same count made of other
    runs: one ended, another started, or the filter was changed after confirming.
    """
    check(allow_control, token, confirmed, env)
    if action not in BULK_ACTIONS:
        raise ValueError(
            f"Unknown bulk action {action!r}: one of {', '.join(BULK_ACTIONS)} (a bulk fork "
            "is fork_runs)"
        )
    from pocoflow.distributed.client import attach

    done: list[str] = []
    failed: dict[str, str] = {}
    for run_id in _confirmed_runs(db, filt, expected, expected_selection):
        try:
            getattr(attach(run_id, db_url), action)()
        except Exception as exc:  # one run's refusal does not stop the others
            failed[run_id] = f"{type(exc).__name__}: {exc}"
        else:
            done.append(run_id)
    return done, failed


def fork_runs(
    filt: Any,
    from_step: int,
    *,
    db: Any,
    db_url: str,
    allow_control: bool,
    token: str,
    confirmed: Confirmation | None,
    expected: int,
    expected_selection: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Forks:
    """Fork every run the filter ``filt`` selects from its checkpoint ``from_step`` onto
    the workers, after ``check`` and the recount ``control_runs`` makes, with
    ``confirmed`` naming the step and its nonce used up here (the forks are queued runs
    the filter may not select: without it a second click would fork the same runs
    again). The broker is checked first, as ``fork_from`` does. A run without that
    checkpoint, or none to fork from there, is skipped and said why."""
    _check_confirmation(allow_control, token, confirmed, _fork_choice(from_step), env)
    step = _step(from_step, "the selected runs")
    from pocoflow.distributed.client import fork_run
    from pocoflow.errors import RunSetupError
    from pocoflow.flow import fork_point

    settings = _reachable_broker(db_url)
    forks = Forks()
    for run_id in _confirmed_runs(db, filt, expected, expected_selection):
        try:
            fork_point(db, run_id, step, db.get_run(run_id) or {})
        except RunSetupError as exc:
            forks.skipped[run_id] = str(exc)
            continue
        try:
            fork_id = fork_run(run_id, step, settings=settings).run_id
        except Exception as exc:  # one run's refusal does not stop the others
            forks.failed[run_id] = f"{type(exc).__name__}: {exc}"
            continue
        forks.forked[run_id] = fork_id
        if not _sent(db, fork_id, step):
            forks.unsent.append(fork_id)
    return forks


def _confirmed_runs(db: Any, filt: Any, expected: int, expected_selection: str | None) -> list[str]:
    """The run ids ``filt`` selects now, if they are the ones confirmed (see
    ``control_runs``); ``ControlRefused`` otherwise."""
    from pocoflow.ui.queries import runs_page

    page = runs_page(db, filt, limit=BULK_LIMIT)
    if page.total != expected:
        raise ControlRefused(
            f"The filter now selects {page.total} runs, not the {expected} you confirmed: "
            "look again"
        )
    if expected_selection is not None and _fingerprint(page.rows) != expected_selection:
        raise ControlRefused(
            f"The filter now selects other runs than the {expected} you confirmed: look again"
        )
    if page.total > BULK_LIMIT:
        raise ControlRefused(f"{page.total} runs: narrow the filter to {BULK_LIMIT} or fewer")
    return [row["run_id"] for row in page.rows]
