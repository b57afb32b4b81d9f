"""The sweeper: finds steps nobody is working on and sends them again (G3).

Kinds of orphans, fastest found first:

* an outbox row never published (the committing worker died between commit and send,
  or the broker was down): sent again with its current attempt after ``grace_s``;
* the broker lost its messages (Redis restarted empty, FLUSHALL): a sentinel key that
  every sweep looks at is gone, so every queued step of a live run is sent again at once,
  in pages (10,000 lost messages take seconds, not 100 per sweep);
* a worker process that stopped beating (killed, frozen, cut off; see ``liveness``) for
  ``dead_after_s``: the step it was running is taken over under a new attempt, which
  fences it out (G1), and the messages it held unstarted (prefetched) are sent again
  under their attempt. This is the 5 s path of G3, whatever the lease says;
* a step or item message a worker took from a Redis broker and died with before its
  heartbeat could record it: its entry in the broker's unacknowledged messages, still
  unclaimed in the ledger after ``dead_after_s`` (``orphans``), is sent again;
* a run waiting for a value (``wait_for``) whose timeout passed: woken, its node runs
  again and gets ``TimeoutError`` (a waiting run's parked step has no lease and is
  marked sent, so no other pass touches it while it waits);
* map items, the same way (``itemsweep``): unsent, held by a dead or expired holder,
  prefetched by a dead process, and a complete join whose step is still parked;
* a step whose lease expired: a claimed one is taken over (the backstop when a process
  never wrote a heartbeat); a queued one nobody claimed is usually just waiting in a long
  queue, so it is sent again only after ``requeue_after_s`` in the queue, and while the
  broker still has messages waiting only after ``REQUEUE_CAP_S`` (no duplicate storm: a
  step 10,000 messages deep is not re-sent every lease period, nor every minute).

A step lost with its worker ``max_crashes`` times in a row is a poison step (its exec
kills the process: ``os._exit``, a segfault, the OOM killer): its run fails with the
reason instead of crashing workers forever.

Several workers sweep at once safely: every transition is a compare-and-set on the
attempt and the lease holder (or receiver), so for one orphan exactly one sweeper acts;
a duplicate resend carries the same attempt, and only one delivery can claim it. The
sweep itself is pure of timing: ``now`` is injected, the thread only decides how often
to call it.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pocoflow.distributed import itemsweep, lifecycle, orphans
from pocoflow.distributed.celery_app import DEFAULT_QUEUE
from pocoflow.distributed.liveness import dead_after
from pocoflow.distributed.message import ItemMessage, StepMessage
from pocoflow.ledger import liveness
from pocoflow.ledger.tables import LIVE_RUN_STATUSES
from pocoflow.logging import get_logger
from pocoflow.settings import DEFAULT_HEARTBEAT_SECONDS, DEFAULT_MAX_CRASHES

if TYPE_CHECKING:
    import redis

    from pocoflow.db import WorkflowDB
    from pocoflow.ledger.prune import Pruner

_log = get_logger("distributed.sweeper")

#: An outbox row younger than this is probably being published right now by the worker
#: that committed it; resending it would only make a duplicate.
UNSENT_GRACE_S = 1.0
#: Because a queued step whose lease ran out is, unless a loss was seen (dead receiver,
#: broker sentinel gone), most likely waiting in a long queue: it is sent again only
#: after this long in the queue, the backstop for a loss nothing else saw.
REQUEUE_AFTER_S = 60.0
#: Because a loss nothing else saw must still be found under constant load: past this
#: long in the queue a step is sent again even while the broker has messages waiting.
REQUEUE_CAP_S = 600.0
#: Rows per page of the bulk re-send after a broker loss.
BULK_PAGE = 1000
#: Expired steps a pass handles (oldest lease first); the rest wait for the next pass.
EXPIRED_PAGE = 100
#: Worker rows silent this long are deleted (their steps were recovered long before).
FORGET_WORKERS_AFTER_S = 3600.0

Publish = Callable[..., bool]
"""``publish(message, queue=...) -> bool``: a ``Publisher`` or a test double."""


@dataclass
class SweepReport:
    resent: list[tuple[str, int]] = field(default_factory=list)
    taken_over: list[tuple[str, int, int]] = field(default_factory=list)
    poisoned: list[tuple[str, int]] = field(default_factory=list)
    #: Messages sent again because the broker lost them (sentinel gone).
    bulk_resent: int = 0
    #: Waiting runs woken because their ``wait_for(key, timeout=...)`` ran out.
    woken: list[tuple[str, str]] = field(default_factory=list)
    #: Map items sent again: unsent, taken over from a dead holder, or dead receiver's.
    items: list[tuple[str, int, int]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(
            self.resent
            or self.taken_over
            or self.poisoned
            or self.bulk_resent
            or self.woken
            or self.items
        )


class BrokerSentinel:
    """Tells whether the broker lost its messages since the last look: a key set in the
    broker's own Redis database disappears with them (restart without persistence,
    FLUSHDB/FLUSHALL). Only one sweeper re-sends (a lock key with a TTL, so a sweeper
    that dies midway is replaced); the sentinel is set again when the re-send is done.

    A missing key is ambiguous only the first time a sweeper looks: a fresh broker whose
    clients published before any worker started has no sentinel either. Then the step
    queues decide: messages waiting there mean nothing was lost (no 2x duplicate of a
    whole backlog at every first start); empty queues with queued steps mean it was.
    """

    KEY = "pocoflow:broker-sentinel"
    LOCK = "pocoflow:broker-sentinel:resend"
    LOCK_TTL_S = 60

    HELD_MEMO_S = 60.0

    def __init__(self, client: redis.Redis, clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.clock = clock  # injected by tests
        self.seen = False
        self._held: dict[bytes, float] = {}
        self._first_seen: dict[bytes, float] = {}

    def lost(self, queues: Callable[[], list[str]] = lambda: [DEFAULT_QUEUE]) -> bool:
        """True (to one sweeper) when the sentinel is gone: re-send, then ``set()``."""
        if self.client.exists(self.KEY):
            self.seen = True
            return False
        if not self.seen and any(self.client.llen(q) for q in queues()):
            self.client.set(self.KEY, "1", nx=True)
            self.seen = True
            return False
        return bool(self.client.set(self.LOCK, "1", nx=True, ex=self.LOCK_TTL_S))

    def busy(self, queues: list[str]) -> bool:
        """Messages wait in one of ``queues`` (a step not claimed may just be there)."""
        return any(self.client.llen(q) for q in queues)

    def orphans(self, older_than_s: float) -> list[orphans.Orphan]:
        """Step and item messages unacknowledged for ``older_than_s`` by their delivery
        time, and seen by this sweeper for half of that (a receiving host's clock may run
        behind), but those known to be held lately (``held``)."""
        now = self.clock()
        wall = time.time()
        entries = orphans.unacked(self.client)
        self._first_seen = {tag: self._first_seen.get(tag, now) for tag, _ in entries}
        self._held = {tag: until for tag, until in self._held.items() if until > now}
        due = [
            tag
            for tag, delivered in entries
            if tag not in self._held
            and wall - delivered >= older_than_s
            and now - self._first_seen[tag] >= older_than_s / 2
        ][: orphans.PAGE]
        found = []
        for tag, message in orphans.decode(self.client, due).items():
            if message is None:  # another task's, or unreadable: not ours to judge
                self.held(tag)
            else:
                found.append(orphans.Orphan(tag, message))
        return found

    def held(self, tag: bytes) -> None:
        """Pass over the entry ``tag`` for ``HELD_MEMO_S``: a live worker's (running with a
        late ack, recorded as received, a parked run's) or not a step's at all, so long
        steps on late-ack workers cost no ledger read each per sweep."""
        self._held[tag] = self.clock() + self.HELD_MEMO_S

    def take(self, tag: bytes) -> bool:
        return orphans.take(self.client, tag)

    def set(self) -> None:
        self.client.set(self.KEY, "1")
        self.client.delete(self.LOCK)
        self.seen = True


class RabbitQueues(BrokerSentinel):
    """The sweeper's view of a RabbitMQ broker: how many messages wait (ready, not yet
    delivered) in the step queues, read with a passive ``queue_declare``, so a step that
    waited ``REQUEUE_AFTER_S`` behind a long queue is held back as on Redis instead of
    sent again every 60 s on top of the backlog.

    Never ``lost``: the queues are durable and the messages persistent (Celery's
    defaults), so a RabbitMQ restart loses nothing, and the unacked messages of a consumer
    that died come back to the queue as soon as its connection drops."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.seen = True
        self._conn: Any = None
        self._held = {}

    def lost(self, queues: Callable[[], list[str]] = lambda: [DEFAULT_QUEUE]) -> bool:
        return False

    def set(self) -> None:
        pass

    def orphans(self, older_than_s: float) -> list[orphans.Orphan]:
        return []  # a dead consumer's unacked messages go back to their queue

    def busy(self, queues: list[str]) -> bool:
        from kombu import Connection

        if self._conn is None:
            self._conn = Connection(self.url, connect_timeout=5)
        try:
            return any(self._waiting(queue) for queue in queues)
        except Exception:
            self.close()  # a fresh connection at the next look
            raise

    def close(self) -> None:
        if self._conn is not None:
            self._conn.release()
            self._conn = None

    def _waiting(self, queue: str) -> int:
        channel = self._conn.channel()  # one each: a missing queue closes its channel
        try:
            return int(channel.queue_declare(queue=queue, passive=True).message_count)
        except self._conn.channel_errors:  # no such queue: nothing waits there
            return 0
        finally:
            try:
                channel.close()
            except Exception:  # already closed by the broker
                pass


def broker_sentinel(broker_url: str) -> BrokerSentinel | None:
    """The sweeper's view of the broker at ``broker_url``: on Redis a sentinel in the
    broker's own database (lost messages) and the queues' lengths; on RabbitMQ
    (``amqp://``, ``pyamqp://``, ``amqps://``) the queues' lengths only (``RabbitQueues``);
    None for another broker. The ledger's paths (dead workers' steps, unsent outbox rows,
    the queue backstop) stay as they are."""
    from pocoflow.settings import default_redis_url

    redis_url = default_redis_url(broker_url)
    if redis_url is None:
        scheme = broker_url.split("://", 1)[0].lower()
        return RabbitQueues(broker_url) if scheme in ("amqp", "amqps", "pyamqp") else None
    from pocoflow.distributed.control import redis_client

    return BrokerSentinel(redis_client(redis_url))


def sweep(
    db: WorkflowDB,
    publish: Publish,
    *,
    lease_s: float,
    now: float | None = None,
    grace_s: float = UNSENT_GRACE_S,
    dead_after_s: float = dead_after(DEFAULT_HEARTBEAT_SECONDS),
    requeue_after_s: float = REQUEUE_AFTER_S,
    max_crashes: int = DEFAULT_MAX_CRASHES,
    sentinel: BrokerSentinel | None = None,
    judge_holders: bool = True,
) -> SweepReport:
    """One pass (see the module docstring for what is found, in this order).

    ``judge_holders=False`` leaves alone every step a worker holds (silent receivers and
    holders, expired claims): what a sweeper does right after the ledger was unreachable
    to it, when a silent heartbeat or an unrenewed lease says nothing of the worker
    (``SweeperThread``).

    Time is the database's clock (read once per pass) unless a test injects ``now``: a
    sweeper whose host clock runs ahead must not declare live workers dead nor take over
    live leases."""
    injected = now
    now = db.clock() if now is None else now
    report = SweepReport()
    runs: dict[str, dict[str, Any] | None] = {}

    def run_of(run_id: str) -> dict[str, Any] | None:
        if run_id not in runs:
            runs[run_id] = db.get_run(run_id)
        return runs[run_id]

    for row in db.unsent_steps(older_than_s=grace_s, now=now):
        run = run_of(row["run_id"])
        if run is None:
            continue
        message = _message(db, run, row, row["attempt"])
        _log.info("Resending unsent step %d of run %s", row["step"], row["run_id"])
        if publish(message, queue=_queue(run, row), **_rest_of_backoff(row, now)):
            report.resent.append((row["run_id"], row["step"]))

    report.woken = _wake_timed_out(db, publish, lease_s, injected)

    if sentinel is not None:
        report.bulk_resent = _after_broker_loss(db, publish, sentinel, now)

    report.items = itemsweep.sweep_items(
        db,
        publish,
        lease_s=lease_s,
        now=now,
        injected=injected,
        grace_s=grace_s,
        dead_after_s=dead_after_s,
        judge_holders=judge_holders,
        max_crashes=max_crashes,
        stale_after_s=lambda: (
            lease_s if sentinel is not None and not _broker_busy(db, sentinel) else REQUEUE_CAP_S
        ),
    )

    dead = liveness.held_by_dead(db, dead_after_s, now=injected) if judge_holders else []
    for row in dead:
        run = run_of(row["run_id"])
        if run is None:
            continue
        if row["status"] == "running":
            owner = row["lease_owner"]
            _recover(
                db,
                publish,
                run,
                row,
                functools.partial(
                    liveness.recover_running,
                    db,
                    row["run_id"],
                    row["step"],
                    row["attempt"],
                    owner,
                    lease_s,
                ),
                "its worker stopped beating",
                max_crashes,
                report,
                crashed=True,
            )
            continue
        receiver = row["received_by"]
        if liveness.recover_received(
            db, row["run_id"], row["step"], row["attempt"], receiver, lease_s
        ):
            _log.warning(
                "Step %d of run %s: worker %s died holding its message; sending it again",
                row["step"],
                row["run_id"],
                receiver,
            )
            later = _rest_of_backoff(row, now)
            message = _message(db, run, row, row["attempt"])
            if publish(message, queue=_queue(run, row), **later):
                report.resent.append((row["run_id"], row["step"]))

    if sentinel is not None and judge_holders:
        _resend_orphans(db, publish, sentinel, run_of, lease_s, dead_after_s, now, report)

    expired = db.expired_steps(now=now, limit=EXPIRED_PAGE)
    # A full page may hide queued rows past it; a short one without any shows there are
    # none to postpone (one expiring since is postponed by the next pass).
    queued_expired = len(expired) >= EXPIRED_PAGE or any(r["status"] == "queued" for r in expired)
    # An expired step nobody claimed, while the broker's step queues are empty, is not
    # waiting behind a backlog: a live worker holds it (recorded as received) or its
    # message is gone, e.g. with a worker killed within a beat of receiving it, before its
    # heartbeat could record it. Gone, it is sent again now, not after the queue backstop.
    broker_idle = (
        any(r["status"] == "queued" for r in expired)
        and sentinel is not None
        and not _broker_busy(db, sentinel)
    )
    if queued_expired and not broker_idle:
        liveness.postpone_waiting(db, requeue_after_s, now=injected)
        expired = db.expired_steps(now=now, limit=EXPIRED_PAGE)
        due = [
            r
            for r in expired
            if r["status"] == "queued" and now >= r["queued_at"] + requeue_after_s
        ]
        if due and sentinel is not None and _broker_busy(db, sentinel):
            # Messages still wait in the broker: a due step is most likely among them.
            liveness.postpone_while_busy(db, requeue_after_s, REQUEUE_CAP_S, now=injected)
            expired = [r for r in expired if r not in due or now >= r["queued_at"] + REQUEUE_CAP_S]
    beats: dict[str, float] | None = None
    for row in expired:
        run = run_of(row["run_id"])
        if run is None:
            continue
        if row["status"] == "queued":  # sent, never claimed
            if broker_idle:
                # Held by a live worker (dead: above), unless past the cap: a mark its
                # process failed to clear must not hold the step for ever.
                held = row["received_by"] is not None
                if held and now < row["queued_at"] + REQUEUE_CAP_S:
                    continue
            elif now < row["queued_at"] + requeue_after_s:  # postponed by another sweeper
                continue
            if db.renew_queued(row["run_id"], row["step"], row["attempt"], lease_s, now=now):
                _log.warning(
                    "Step %d of run %s: attempt %d was not claimed (queued %.0fs ago); "
                    "sending it again",
                    row["step"],
                    row["run_id"],
                    row["attempt"],
                    now - row["queued_at"],
                )
                if publish(_message(db, run, row, row["attempt"]), queue=_queue(run, row)):
                    report.resent.append((row["run_id"], row["step"]))
            continue
        if not judge_holders:
            continue
        if beats is None:
            beats = liveness.last_beats(db)
        owner = row["lease_owner"] or ""
        beat = beats.get(owner.rpartition("#")[0] or owner)
        # A crash only if its process missed beats too (it died before the heartbeat
        # pass could tell); a live process's expired lease (a ledger error ended the
        # delivery) says nothing about the node.
        crashed = beat is not None and beat < now - dead_after_s / 2
        _recover(
            db,
            publish,
            run,
            row,
            functools.partial(
                db.take_over,
                row["run_id"],
                row["step"],
                row["attempt"],
                lease_s,
                now=now,
                note=liveness.WORKER_DIED if crashed else None,
            ),
            "its lease expired",
            max_crashes,
            report,
            crashed=crashed,
        )
    return report


def _recover(
    db: WorkflowDB,
    publish: Publish,
    run: dict[str, Any],
    row: dict[str, Any],
    take_over: Callable[[], int | None],
    why: str,
    max_crashes: int,
    report: SweepReport,
    *,
    crashed: bool,
) -> None:
    """A claimed step whose holder is gone: fail its run if this is the
    ``max_crashes``-th attempt lost with its worker process (a poison step; ``crashed``:
    this holder's process stopped beating, not only its lease ran out), else take it
    over (``take_over``: new attempt, fencing the holder out, G1) and send it.

    The poison verdict is written as the dead holder's failure (``fail_run`` fenced on
    its claim), so a holder that was only slow and commits first wins, and the step row,
    the attempt row, the events and the run's status change in one transaction."""
    run_id, step, owner = row["run_id"], row["step"], row["lease_owner"]
    attempts = db.get_attempts(run_id)
    lost, retries = liveness.crashes(attempts, step)
    if crashed and lost + 1 >= max_crashes:
        in_executor = lost - liveness.crash_kinds(attempts, step)[1]
        what = f"was lost with its worker {lost + 1} times in a row"
        if in_executor:  # a mix: say so, rather than blame the exec for every crash
            what = (
                f"crashed {lost + 1} times in a row ({lost + 1 - in_executor} with its worker "
                f"process dying, {in_executor} in the executor)"
            )
        error = (
            f"Step {step} (node {row['node_id']!r}) of run {run_id} {what} (last on "
            f"{owner}): a poison step, whose exec likely kills its process (os._exit, a "
            "segfault, the OOM killer). Fix the node or raise POCOFLOW_MAX_CRASHES, then "
            "resume the run."
        )
        if lifecycle.fail_run(
            db,
            run_id,
            error,
            step=step,
            attempt=row["attempt"],
            holder=owner,
            worker=owner.rpartition("#")[0] or owner,
            node_name=row["node_id"],
            # "failed", not "lost": the verdict ends the step for good, so a resume
            # starts its crash count afresh (``liveness.FRESH_START_AFTER``).
        ):
            report.poisoned.append((run_id, step))
            _log.error("%s", error)
        return
    new_attempt = take_over()
    if new_attempt is None:  # another sweeper (or the holder's renewal) won
        return
    _log.warning(
        "Step %d of run %s: %s (attempt %d on %s); re-running as attempt %d",
        step,
        run_id,
        why,
        row["attempt"],
        owner,
        new_attempt,
    )
    report.taken_over.append((run_id, step, new_attempt))
    message = StepMessage(
        run_id=run_id,
        flow=run["flow_name"],
        step=step,
        node_id=row["node_id"],
        attempt=new_attempt,
        try_number=retries + 1,
    )
    publish(message, queue=_queue(run, row))


def _wake_timed_out(
    db: WorkflowDB, publish: Publish, lease_s: float, now: float | None
) -> list[tuple[str, str]]:
    """Wake the waiting runs whose ``wait_for(key, timeout=...)`` deadline passed with no
    value: their node runs again and ``wait_for`` raises ``TimeoutError``. Each wake is a
    compare-and-set on the run row, so of a send and several sweepers exactly one wins."""
    woken = []
    for run_id, key in db.expired_waits(now=now):
        found = db.wake_expired_wait(run_id, key, lease_s=lease_s, now=now)
        if found is None:
            continue
        _log.warning("Run %s: the wait for %r timed out; its node runs again", run_id, key)
        lifecycle.wake(db, found, publish, lease_s=lease_s)
        woken.append((run_id, key))
    return woken


def _resend_orphans(
    db: WorkflowDB,
    publish: Publish,
    sentinel: BrokerSentinel,
    run_of: Callable[[str], dict[str, Any] | None],
    lease_s: float,
    older_than_s: float,
    now: float,
    report: SweepReport,
) -> None:
    """Send again the steps and items whose message a dead worker took from the broker
    unrecorded (``orphans``): the ledger still has them queued under that attempt, sent,
    unclaimed, held by no worker. An entry whose attempt is over (or whose run finished)
    is only removed; one a live worker holds, or of a parked run, is passed over."""
    try:
        found = sentinel.orphans(older_than_s)
    except Exception as exc:  # the broker is down: its messages are found once it is back
        _log.warning("Could not read the broker's unacknowledged messages: %s", exc)
        return
    sent_now = set(report.resent)
    items_now = set(report.items)
    for orphan in found:
        try:
            _resend_orphan(
                db,
                publish,
                sentinel,
                orphan,
                run_of,
                lease_s,
                older_than_s,
                now,
                report,
                sent_now,
                items_now,
            )
        except Exception as exc:
            from pocoflow.distributed.executor import _unreachable

            if _unreachable(exc):  # the ledger blinked: as any other pass, the sweep ends
                raise
            # A bad entry (a value no ledger column takes): passed over for a while, so it
            # stops neither this sweep nor every sweep until Redis restores it in an hour.
            sentinel.held(orphan.tag)
            _log.warning("Could not judge the unacknowledged message %r: %s", orphan.message, exc)


def _resend_orphan(
    db: WorkflowDB,
    publish: Publish,
    sentinel: BrokerSentinel,
    orphan: orphans.Orphan,
    run_of: Callable[[str], dict[str, Any] | None],
    lease_s: float,
    settled_s: float,
    now: float,
    report: SweepReport,
    sent_now: set[tuple[str, int]],
    items_now: set[tuple[str, int, int]],
) -> None:
    message = orphan.message
    item = isinstance(message, ItemMessage)
    if isinstance(message, ItemMessage):
        row = db.get_item(message.run_id, message.step, message.idx)
        again = message.key[:3] in items_now
    else:
        row = db.get_step(message.run_id, message.step)
        again = (message.run_id, message.step) in sent_now
    run = run_of(message.run_id)
    if (
        row is None
        or run is None
        or row["attempt"] != message.attempt
        or row["status"] not in ("queued", "running")
        or run["status"] not in (*LIVE_RUN_STATUSES, "paused")
        or again  # this sweep sent it already (a dead receiver's): the entry is the old copy
    ):
        sentinel.take(orphan.tag)  # its attempt is over, or sent anew: nothing to send
        return
    if (
        row["status"] != "queued"  # claimed: it runs (a late ack), or its holder is judged
        or row["received_by"] is not None  # recorded: a live worker's, or a dead one's
        or row["sent_at"] is None  # unsent: the outbox pass sends it
        or run["status"] not in ("queued", "running")  # parked: a resume sends it
    ):
        sentinel.held(orphan.tag)
        return
    # The ledger decides who sends it (one sweeper wins), and makes it an outbox row
    # first: whatever happens next, the unsent pass sends it if this sweeper does not.
    if item:
        assert isinstance(message, ItemMessage)
        if not db.unsend_item(*message.key, row["sent_at"], settled_s):
            return
    elif not liveness.release_unrecorded(
        db, message.run_id, message.step, message.attempt, row["sent_at"], lease_s, settled_s
    ):
        return
    if not sentinel.take(orphan.tag):  # another sweeper owns it, and sends it
        if isinstance(message, ItemMessage):
            db.keep_item_sent(*message.key, row["sent_at"])
        else:
            liveness.keep_sent(db, message.run_id, message.step, message.attempt, row["sent_at"])
        return
    where = f"step {message.step} of run {message.run_id}"
    if isinstance(message, ItemMessage):
        where = f"item {message.idx} of {where}"
    _log.warning("%s: its message was taken by a worker that is gone; sending it again", where)
    if isinstance(message, ItemMessage):
        step_row = db.get_step(message.run_id, message.step) or {}
        joined = {
            **row,
            "flow_name": run["flow_name"],
            "node_id": step_row.get("node_id", message.node_id),
            "queue": step_row.get("queue") or run.get("queue"),
        }
        resend = itemsweep.item_message(joined, message.attempt)
        if publish(resend, queue=joined["queue"], **_rest_of_backoff(row, now)):
            report.items.append(message.key[:3])
        return
    step_message = _message(db, run, row, message.attempt)
    if publish(step_message, queue=_queue(run, row), **_rest_of_backoff(row, now)):
        report.resent.append((message.run_id, message.step))


def _broker_busy(db: WorkflowDB, sentinel: BrokerSentinel) -> bool:
    try:
        return sentinel.busy(liveness.queues_in_use(db, DEFAULT_QUEUE))
    except Exception as exc:  # cannot tell: the backstop re-sends, as without a broker view
        _log.warning("Could not read the broker's queue lengths: %s", exc)
        return False


def _after_broker_loss(
    db: WorkflowDB, publish: Publish, sentinel: BrokerSentinel, now: float
) -> int:
    try:
        if not sentinel.lost(lambda: liveness.queues_in_use(db, DEFAULT_QUEUE)):
            return 0
    except Exception as exc:  # the broker is down: its loss is seen once it is back
        _log.warning("Could not check the broker sentinel: %s", exc)
        return 0
    sent = _resend_all_queued(db, publish, now) + itemsweep.resend_all(db, publish, now)
    sentinel.set()
    return sent


def _resend_all_queued(db: WorkflowDB, publish: Publish, now: float) -> int:
    """The broker lost its messages: send every queued, already-sent step of a live run
    again under its attempt, page by page (one query per ``BULK_PAGE`` steps, and the
    attempts read only for a step past its first attempt)."""
    sent = 0
    after: tuple[str, int] | None = None
    while True:
        page = liveness.queued_steps(db, after, BULK_PAGE)
        for row in page:
            run = {"flow_name": row["flow_name"], "queue": row["queue"], "run_id": row["run_id"]}
            later = _rest_of_backoff(row, now)
            if publish(_message(db, run, row, row["attempt"]), queue=row["queue"], **later):
                sent += 1
        if len(page) < BULK_PAGE:
            break
        after = (page[-1]["run_id"], page[-1]["step"])
    if sent:
        _log.warning("The broker lost its messages: sent %d queued steps again", sent)
    return sent


def _rest_of_backoff(row: dict[str, Any], now: float) -> dict[str, float]:
    """The countdown of a message sent again before its step is due: a retry is queued
    as of the end of its backoff (``executor._retry``), so every re-send (unsent row,
    broker loss, dead receiver) keeps what is left of it instead of running the retry
    at once."""
    wait = row["queued_at"] - now
    return {"countdown": wait} if wait > 0 else {}


def _queue(run: dict[str, Any], row: dict[str, Any]) -> str | None:
    """The step's own queue (its node's ``queue``), else the run's."""
    return row.get("queue") or run.get("queue")


def _message(db: WorkflowDB, run: dict[str, Any], row: dict[str, Any], attempt: int) -> StepMessage:
    """The step message for ``row``; ``try_number`` continues after the retries recorded
    since the step last ended for good (failed, refused, cancelled: a resume starts its
    tries afresh), so a lost retry message does not reset the ``max_retries`` budget.
    A first attempt has no earlier ones: no query."""
    retries = 0
    if attempt > 1:
        retries = liveness.crashes(db.get_attempts(row["run_id"]), row["step"])[1]
    return StepMessage(
        run_id=row["run_id"],
        flow=run["flow_name"],
        step=row["step"],
        node_id=row["node_id"],
        attempt=attempt,
        try_number=retries + 1,
    )


class SweeperThread(threading.Thread):
    """Calls ``sweep`` every ``interval_s`` on a daemon thread until ``stop()``.

    A failing sweep (ledger unreachable) is logged and tried again next interval: the
    sweeper must outlive the outages it exists to repair. After one, steps held by
    workers are left alone until the ledger has answered for ``dead_after_s``: no
    worker could beat or renew its lease meanwhile either, so a live worker would be
    declared dead, its step taken over and the loss counted toward the poison limit
    (G3 without a false poison verdict); a worker still silent then is dead. ``sweep_options`` are passed
    to every ``sweep`` (dead_after_s, max_crashes...); ``sentinel_factory`` builds the
    broker-loss sentinel (None: a broker that is not Redis, no loss detection).
    """

    def __init__(
        self,
        db_factory: Callable[[], WorkflowDB],
        publish_factory: Callable[[], Publish],
        *,
        lease_s: float,
        interval_s: float,
        pruner: Pruner | None = None,
        sentinel_factory: Callable[[], BrokerSentinel | None] | None = None,
        **sweep_options: Any,
    ) -> None:
        super().__init__(name="pocoflow-sweeper", daemon=True)
        self.pruner = pruner
        self._db_factory = db_factory
        self._publish_factory = publish_factory
        self._sentinel_factory = sentinel_factory
        self.lease_s = lease_s
        self.interval_s = interval_s
        self.sweep_options = sweep_options
        self._stop_event = threading.Event()

    def run(self) -> None:
        db = publish = sentinel = None
        pruned_at = 0.0
        grace_s = self.sweep_options.get("dead_after_s", dead_after(DEFAULT_HEARTBEAT_SECONDS))
        answering_since: float | None = float("-inf")  # None: the last sweep failed
        while not self._stop_event.wait(self.interval_s):
            try:
                if db is None or publish is None:
                    db, publish = self._db_factory(), self._publish_factory()
                    sentinel = self._sentinel_factory() if self._sentinel_factory else None
                judge = answering_since is not None and (
                    time.monotonic() - answering_since >= grace_s
                )
                sweep(
                    db,
                    publish,
                    lease_s=self.lease_s,
                    sentinel=sentinel,
                    judge_holders=judge,
                    **self.sweep_options,
                )
                if answering_since is None:
                    answering_since = time.monotonic()
                if time.monotonic() - pruned_at > FORGET_WORKERS_AFTER_S / 10:
                    liveness.prune_workers(db, FORGET_WORKERS_AFTER_S)
                    pruned_at = time.monotonic()
                if self.pruner is not None:  # retention (POCOFLOW_PRUNE_OLDER_THAN)
                    self.pruner.tick(db, time.monotonic())
            except Exception:
                answering_since = None
                _log.exception("Sweep failed; trying again in %.1fs", self.interval_s)

    def stop(self, timeout: float | None = 5.0) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)
