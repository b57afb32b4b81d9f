"""The human-in-the-loop half of the ledger API: park a run that waits for a value, send
the value, wake the run. The queries (and why the two cannot lose each other) are in
``pocoflow.ledger.signals``."""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Connection

from pocoflow import codec
from pocoflow.errors import SendRefused, UnknownRunError
from pocoflow.hooks import RUN_WAITING, SIGNAL_SENT, WAIT_TIMED_OUT
from pocoflow.ledger import signals, txn
from pocoflow.ledger.client import LedgerClient
from pocoflow.ledger.common import iso_now
from pocoflow.ledger.signals import StepFence, Wake
from pocoflow.waiting import PARKED, Signal, check_key, check_timeout


class SignalInbox(LedgerClient):
    """Ledger calls of ``Node.wait_for`` (read, park) and ``RunHandle.send`` (send, wake).
    Times are the database's clock; ``now`` replaces it, for tests."""

    def read_signal(self, run_id: str, key: str, *, now: float | None = None) -> Signal:
        """What ``wait_for(key)`` returns or raises: the value sent for ``key`` (decoded
        with the Store's codec), else whether the wait's deadline passed."""
        row = self._read(lambda conn: signals.get(conn, run_id, key, now), run_id)
        if row is None:
            return Signal(sent=False)
        if row["value_json"] is not None:
            return Signal(sent=True, value=codec.decode(row["value_json"], key=key))
        return Signal(sent=False, expired=bool(row["expired"]))

    def park_waiting(
        self,
        run_id: str,
        key: str,
        *,
        step: int,
        node_name: str,
        timeout: float | None = None,
        fence: StepFence | None = None,
        now: float | None = None,
    ) -> str:
        """Mark the run ``waiting`` for ``key`` before ``step`` (a distributed delivery
        passes the claim it holds, ``fence``, and its step is handed over, unheld).
        Returns ``PARKED``, or, nothing written: ``SIGNALLED`` (the value is
        there, run the node again now), ``STOPPED`` (the run is not running: cancelled,
        paused or a pause request stands) or ``LOST`` (the claim was taken over, G1)."""
        timeout = check_timeout(timeout)
        stamp = iso_now()
        event = {
            "event": RUN_WAITING,
            "step": step,
            "node_name": node_name,
            "error_msg": f"waits for {key!r}"
            + (f" (timeout {timeout:g}s)" if timeout is not None else ""),
            "attempt": fence.attempt if fence is not None else None,
            "ts": stamp,
        }

        def body(conn: Connection) -> str:
            found = signals.park(conn, run_id, key, step, timeout, stamp, now, fence, [event])
            if found != PARKED:
                raise txn.Abort(found)
            return found

        def own_park(conn: Connection, found: str) -> str:
            if found == PARKED or not signals.parked_by(conn, run_id, key, step, now):
                return found
            return PARKED

        return self._write(body, f"parking step {step} to wait", run_id, confirm=own_park)

    def send_signal(
        self, run_id: str, key: str, value: Any, *, lease_s: float, now: float | None = None
    ) -> Wake | None:
        """Record ``value`` for ``key`` of the run, once; if the run waits on that key and
        runs on workers, set it running and write its parked step as an unsent outbox
        row: the returned ``Wake`` is the message to publish (None: nothing to wake).

        ``UnknownRunError`` for an unknown run; ``SendRefused`` naming run and key for a
        completed or cancelled run or a key that has a value already; ``TypeError`` (``CodecError``)
        for a value that would not round-trip. Nothing is written then."""
        key = check_key(key)
        try:
            text = codec.encode(value, key=key)
        except TypeError as exc:  # CodecError: say it is a sent value, not a Store value
            raise TypeError(
                f"Run {run_id!r}: the value sent for {key!r} cannot be stored: {exc}"
            ) from None
        stamp = iso_now()
        event = {"event": SIGNAL_SENT, "error_msg": f"value sent for {key!r}", "ts": stamp}

        def body(conn: Connection) -> tuple[str, Wake | None]:
            return signals.send(conn, run_id, key, text, stamp, lease_s, now, [event])

        def own_send(conn: Connection, result: tuple[str, Wake | None]) -> tuple[str, Wake | None]:
            # The retry met the value the lost COMMIT wrote: it was this call's. Its wake,
            # if any, was written as an unsent outbox row, which the sweeper sends.
            row = signals.get(conn, run_id, key, now)
            if result[0] == "duplicate" and row is not None and row["value_json"] == text:
                return "sent", None
            return result

        outcome, wake = self._write(body, f"sending {key!r}", run_id, confirm=own_send)
        if outcome == "unknown":
            raise UnknownRunError(f"Unknown run id {run_id!r} in ledger {self._ledger.label}")
        if outcome == "finished":
            status = (self.get_run(run_id) or {}).get("status", "finished")  # type: ignore[attr-defined]
            raise SendRefused(
                f"Run {run_id!r} is {status}: no value can be sent to it any more "
                f"(key {key!r}); only a run that may still go on (queued, running, paused, "
                "waiting or failed) takes one",
                run_id=run_id,
                key=key,
            )
        if outcome == "duplicate":
            raise SendRefused(
                f"Run {run_id!r} already has a value for {key!r}: each key of a run takes "
                "one value; send the next answer under another key",
                run_id=run_id,
                key=key,
            )
        return wake

    def wake_expired_wait(
        self, run_id: str, key: str, *, lease_s: float, now: float | None = None
    ) -> Wake | None:
        """The sweeper's half of ``wait_for(key, timeout=...)``: wake a distributed run
        whose wait passed its deadline with no value; its node runs again and gets
        ``TimeoutError``. None, nothing written, if a send or another sweeper came first."""
        stamp = iso_now()
        event = {"event": WAIT_TIMED_OUT, "error_msg": f"no value for {key!r}", "ts": stamp}

        def body(conn: Connection) -> Wake | None:
            wake = signals.wake_expired(conn, run_id, key, stamp, lease_s, now, [event])
            if wake is None:
                raise txn.Abort(None)
            return wake

        return self._write(body, f"waking the wait for {key!r}", run_id)

    def expired_waits(self, *, now: float | None = None, limit: int = 100) -> list[tuple[str, str]]:
        """``(run_id, key)`` of distributed runs waiting past their wait's deadline."""
        return self._read(lambda conn: signals.expired_waits(conn, now, limit))

    def get_signals(self, run_id: str) -> list[dict[str, Any]]:
        """The run's signal rows by creation: ``key``, ``value`` (decoded; absent while
        not sent), ``sent_at``, ``waiting_step``, ``wait_until``."""
        rows = self._read(lambda conn: signals.list_rows(conn, run_id), run_id)
        for row in rows:
            text = row.pop("value_json")
            if text is not None:
                row["value"] = codec.decode(text, key=row["key"])
        return rows
