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
modules (``POCOFLOW_BROKER_URL``, ``POCOFLOW_FLOWS``) in its environment.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ACTIONS",
    "BULK_ACTIONS",
    "TOKEN_ENV",
    "ControlRefused",
    "Forks",
    "confirmed_choice",
    "control_run",
    "control_runs",
    "controls_enabled",
    "fork_from",
    "fork_runs",
    "selection",
]

TOKEN_ENV = "POCOFLOW_MONITOR_TOKEN"
ACTIONS = ("cancel", "pause", "resume", "send", "fork")
BULK_ACTIONS = ("cancel", "pause", "resume", "fork")
#: The bulk actions ``control_runs`` performs; a bulk fork is ``fork_runs``.
_STEERING = ("cancel", "pause", "resume")
BULK_LIMIT = 1000
"""At most this many runs per bulk action: a filter is narrowed, not a ledger emptied."""


class ControlRefused(PermissionError):
    """A control the monitor will not perform; the message says which condition failed."""


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
    confirmed: bool,
    key: str | None = None,
    value_json: str | None = None,
    from_step: int | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """Perform ``action`` on ``run_id`` after ``check``; returns what was done, in a line.

    Goes through ``attach(run_id).cancel()/pause()/resume()/send()``, as the CLI does, so
    a run on the workers is steered through Redis and the ledger and an in-process run
    through the ledger; ``fork`` is ``fork_from``. ``KeyError`` for an unknown run,
    ``ValueError`` for bad input.
    """
    check(allow_control, token, confirmed, env)
    if action not in ACTIONS:
        raise ValueError(f"Unknown action {action!r}: one of {', '.join(ACTIONS)}")
    if action == "fork":
        new_run_id = fork_from(
            run_id,
            _step(from_step, f"run {run_id!r}"),
            db_url=db_url,
            allow_control=allow_control,
            token=token,
            confirmed=confirmed,
            env=env,
        )
        return f"run {run_id}: forked from step {from_step} as {new_run_id}"
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


def confirmed_choice(action: str | None, from_step: int | None = None) -> str | None:
    """What a confirmation tick is bound to: the action, and for a fork its step (a tick
    for "fork from step 2" does not confirm a fork from step 5)."""
    return f"fork from {from_step}" if action == "fork" else action


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
    confirmed: bool,
    env: Mapping[str, str] | None = None,
) -> str:
    """Fork ``run_id`` from checkpoint ``from_step`` onto the workers after ``check``;
    returns the new run's id. ``fork_run``'s errors (unknown run, no such checkpoint,
    nothing after it, an unregistered flow) pass through, each naming run and step."""
    check(allow_control, token, confirmed, env)
    from pocoflow.distributed.client import fork_run

    return fork_run(run_id, _step(from_step, f"run {run_id!r}"), db_url=db_url).run_id


@dataclass
class Forks:
    """What a bulk fork did: ``forked`` parent -> fork, ``skipped`` the runs with no step
    to fork from (why), ``failed`` the forks refused (the error)."""

    forked: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


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
    if action not in _STEERING:
        raise ValueError(f"Unknown bulk action {action!r}: one of {', '.join(_STEERING)}")
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
    confirmed: bool,
    expected: int,
    expected_selection: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Forks:
    """Fork every run the filter ``filt`` selects from its checkpoint ``from_step`` onto
    the workers, after ``check`` and the recount ``control_runs`` makes. A run without
    that checkpoint, or whose step ``from_step`` was its last, is skipped and said why."""
    check(allow_control, token, confirmed, env)
    _step(from_step, "the selected runs")
    from pocoflow.distributed.client import fork_run

    forks = Forks()
    for run_id in _confirmed_runs(db, filt, expected, expected_selection):
        try:
            checkpoint = db.get_checkpoint(run_id, from_step)
        except KeyError:
            forks.skipped[run_id] = f"no checkpoint of step {from_step}"
            continue
        if checkpoint.get("next_node") is None:
            forks.skipped[run_id] = f"step {from_step} was its last step"
            continue
        try:
            forks.forked[run_id] = fork_run(run_id, from_step, db_url=db_url).run_id
        except Exception as exc:  # one run's refusal does not stop the others
            forks.failed[run_id] = f"{type(exc).__name__}: {exc}"
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
