"""What the monitor's control buttons do: cancel, pause, resume, send, each checked here.

The check lives in the action, not in the page that shows the buttons, because a hidden
button is no protection: anything that reaches ``control_run`` (a crafted rerun, another
page embedding the monitor) is refused unless all three hold: the monitor was started
with ``--allow-control`` (``allow_control=True``), ``POCOFLOW_MONITOR_TOKEN`` is set in
the monitor's environment and the token typed into the page matches it, and the user
confirmed the action.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Mapping
from typing import Any

__all__ = [
    "ACTIONS",
    "BULK_ACTIONS",
    "TOKEN_ENV",
    "ControlRefused",
    "control_run",
    "control_runs",
    "controls_enabled",
    "selection",
]

TOKEN_ENV = "POCOFLOW_MONITOR_TOKEN"
ACTIONS = ("cancel", "pause", "resume", "send")
BULK_ACTIONS = ("cancel", "pause", "resume")
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
    env: Mapping[str, str] | None = None,
) -> str:
    """Perform ``action`` on ``run_id`` after ``check``; returns what was done, in a line.

    Goes through ``attach(run_id).cancel()/pause()/resume()/send()``, as the CLI does, so
    a run on the workers is steered through Redis and the ledger and an in-process run
    through the ledger. ``KeyError`` for an unknown run, ``ValueError`` for bad input.
    """
    check(allow_control, token, confirmed, env)
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
    ``(done run ids, {run id: error})``.

    ``expected`` is the count the user saw and confirmed; the filter is counted again here
    and a different count is refused, because runs that started or ended since the page
    was drawn are not what was confirmed. ``expected_selection`` (the fingerprint from
    ``selection`` taken when the user confirmed) also refuses the same count made of other
    runs: one ended, another started, or the filter was changed after confirming.
    """
    check(allow_control, token, confirmed, env)
    if action not in BULK_ACTIONS:
        raise ValueError(f"Unknown bulk action {action!r}: one of {', '.join(BULK_ACTIONS)}")
    from pocoflow.distributed.client import attach
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
    done: list[str] = []
    failed: dict[str, str] = {}
    for row in page.rows:
        run_id = row["run_id"]
        try:
            getattr(attach(run_id, db_url), action)()
        except Exception as exc:  # one run's refusal does not stop the others
            failed[run_id] = f"{type(exc).__name__}: {exc}"
        else:
            done.append(run_id)
    return done, failed
