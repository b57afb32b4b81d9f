"""Fast, bounded recovery on both ledgers with an injected clock (G3): a worker process
that stops beating loses its running step and its prefetched messages within
``dead_after``, whatever their leases say; a step lost with its worker ``max_crashes``
times fails its run as a poison step; a broker that lost its messages gets every queued
step again in one sweep."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from pocoflow.distributed import sweeper
from pocoflow.distributed.sweeper import sweep
from pocoflow.ledger import liveness
from tests.helpers import wait_until
from tests.ledger.test_sweeper import Sent, submitted

pytestmark = pytest.mark.ledger

LONG_LEASE_S = 60.0  # far beyond every sweep below: only liveness can find the orphans
DEAD_AFTER_S = 3.0


def swept(db: Any, sent: Sent, now: float, **kw: Any) -> sweeper.SweepReport:
    return sweep(db, sent, lease_s=LONG_LEASE_S, now=now, dead_after_s=DEAD_AFTER_S, **kw)


def test_a_dead_workers_running_step_is_taken_over_long_before_its_lease_ends(db: Any) -> None:
    first, t0 = submitted(db)
    db.mark_sent(first.run_id, 0, 1, now=t0)
    assert db.claim_step(first.run_id, 0, 1, "host:11", LONG_LEASE_S, now=t0)
    liveness.record_beat(db, "host:11", "host", 11, now=t0)
    sent = Sent(db)
    assert not swept(db, sent, t0 + DEAD_AFTER_S - 0.1)  # beat recently: alive
    liveness.record_beat(db, "host:11", "host", 11, now=t0 + 1)  # still beating
    assert not swept(db, sent, t0 + 1 + DEAD_AFTER_S - 0.1)
    report = swept(db, sent, t0 + 1 + DEAD_AFTER_S + 0.1)  # silent for dead_after
    assert report.taken_over == [(first.run_id, 0, 2)]
    ((message, _),) = sent.messages
    assert (message.attempt, message.try_number) == (2, 1)
    (old,) = db.get_attempts(first.run_id)
    assert old["outcome"] == "lost"
    assert not db.claim_step(first.run_id, 0, 1, "host:11", LONG_LEASE_S, now=t0 + 5)  # fenced


def test_a_dead_workers_prefetched_message_is_sent_again_under_its_attempt(db: Any) -> None:
    first, t0 = submitted(db)
    second, _ = submitted(db)
    for run in (first, second):
        db.mark_sent(run.run_id, 0, 1, now=t0)
    liveness.record_beat(db, "host:21", "host", 21, [(first.run_id, 0, 1)], now=t0)
    liveness.record_beat(db, "host:22", "host", 22, [(second.run_id, 0, 1)], now=t0)
    assert db.get_step(first.run_id, 0)["received_by"] == "host:21"
    liveness.record_beat(db, "host:22", "host", 22, now=t0 + DEAD_AFTER_S)  # 22 lives on
    sent = Sent(db)
    report = swept(db, sent, t0 + DEAD_AFTER_S + 0.1)
    assert report.resent == [(first.run_id, 0)]  # only the dead receiver's message
    assert [(m.run_id, m.attempt) for m, _ in sent.messages] == [(first.run_id, 1)]
    assert db.get_step(first.run_id, 0)["received_by"] is None
    assert not swept(db, sent, t0 + DEAD_AFTER_S + 0.2)  # once
    assert db.claim_step(first.run_id, 0, 1, "host:23", LONG_LEASE_S, now=t0 + 4)


def test_a_claim_clears_the_received_mark_so_only_held_messages_keep_one(db: Any) -> None:
    """``received_by`` says a process holds the message unstarted; the claim starts it. A
    mark left on started and finished rows would keep the held-messages index growing
    with the history (migration 0014), and a sweep's dead-receiver seek with it."""
    first, t0 = submitted(db)
    db.mark_sent(first.run_id, 0, 1, now=t0)
    liveness.record_beat(db, "host:31", "host", 31, [(first.run_id, 0, 1)], now=t0)
    assert db.get_step(first.run_id, 0)["received_by"] == "host:31"
    assert db.claim_step(first.run_id, 0, 1, "host:31", LONG_LEASE_S, now=t0 + 1)
    assert db.get_step(first.run_id, 0)["received_by"] is None


class IdleBroker:
    """A sentinel whose broker lost nothing and holds no message: the sweeper's view when
    every queue is empty."""

    def lost(self, queues: Any = None) -> bool:
        return False

    def set(self) -> None:
        pass

    def orphans(self, older_than_s: float) -> list[Any]:
        return []

    def busy(self, queues: Any) -> bool:
        return False


def test_a_new_attempt_does_not_inherit_the_old_receivers_mark(db: Any) -> None:
    """A live worker received attempt 1 (its beat marked the row), the run was paused and
    resumed: attempt 2 is held by nobody. Were the mark kept, a lost attempt-2 message
    would count as held by that live worker and never be sent again."""
    from pocoflow.distributed import lifecycle

    first, t0 = submitted(db)
    db.mark_sent(first.run_id, 0, 1, now=t0)
    liveness.record_beat(db, "host:41", "host", 41, [(first.run_id, 0, 1)], now=t0)
    db.update_run(first.run_id, status="paused")
    db.update_run(first.run_id, status="running")
    sent = Sent(db)
    lifecycle.requeue_outstanding(db, first.run_id, sent, lease_s=2.0)
    row = db.get_step(first.run_id, 0)
    assert (row["attempt"], row["received_by"]) == (2, None)
    sent.messages.clear()  # attempt 2's message is lost; host:41 lives on
    for k in range(1, 4):
        liveness.record_beat(db, "host:41", "host", 41, [], now=t0 + k * 10)
        sweep(db, sent, lease_s=2.0, now=t0 + k * 10, sentinel=IdleBroker(), dead_after_s=3.0)
    assert [m.attempt for m, _ in sent.messages][:1] == [2]


def test_a_step_lost_with_its_worker_max_crashes_times_fails_its_run(db: Any) -> None:
    poison, t0 = submitted(db)
    healthy, _ = submitted(db)
    run_id = poison.run_id
    db.mark_sent(run_id, 0, 1, now=t0)
    sent = Sent(db)
    for crash in range(1, 4):
        t = t0 + 10 * crash
        worker = f"host:{100 + crash}"
        assert db.claim_step(run_id, 0, crash, worker, LONG_LEASE_S, now=t)
        liveness.record_beat(db, worker, "host", 100 + crash, now=t)
        report = swept(db, sent, t + DEAD_AFTER_S + 0.1, max_crashes=3)
        if crash < 3:
            assert report.taken_over == [(run_id, 0, crash + 1)]
    assert report.poisoned == [(run_id, 0)] and not report.taken_over
    assert [m.attempt for m, _ in sent.messages if m.run_id == run_id] == [2, 3]  # no 3rd
    run = db.get_run(run_id)
    assert run["status"] == "failed"
    assert "lost with its worker 3 times" in run["error_msg"]
    assert "POCOFLOW_MAX_CRASHES" in run["error_msg"] and "node 'a'" in run["error_msg"]
    assert db.get_step(run_id, 0)["status"] == "failed"
    assert db.get_run(healthy.run_id)["status"] in ("queued", "running")  # others go on


class LostOnce:
    """A broker sentinel that reports one loss, then none (what BrokerSentinel does with
    a Redis that restarted empty)."""

    def __init__(self) -> None:
        self.looks = 0
        self.restored = False

    def lost(self, queues: Any = None) -> bool:
        self.looks += 1
        return self.looks == 1

    def set(self) -> None:
        self.restored = True


def test_a_broker_loss_sends_every_queued_step_again_in_one_sweep(
    db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sweeper, "BULK_PAGE", 7)  # several pages without thousands of runs
    runs = [submitted(db)[0] for _ in range(30)]
    t0 = max(db.get_step(r.run_id, 0)["queued_at"] for r in runs)
    for run in runs:
        db.mark_sent(run.run_id, 0, 1, now=t0)
    claimed = runs[0]  # running on a live worker: its message is not in the broker
    assert db.claim_step(claimed.run_id, 0, 1, "host:31", LONG_LEASE_S, now=t0)
    sentinel = LostOnce()
    sent = Sent(db)
    report = swept(db, sent, t0 + 0.5, sentinel=sentinel)  # old code: 100 per 4 s sweep
    assert report.bulk_resent == 29 and sentinel.restored
    assert sorted(m.run_id for m, _ in sent.messages) == sorted(r.run_id for r in runs[1:])
    assert {m.attempt for m, _ in sent.messages} == {1}
    assert not swept(db, sent, t0 + 0.6, sentinel=sentinel)


def test_broker_sentinel_reports_a_flushed_broker_once(fake_redis: Any) -> None:
    sentinel = sweeper.BrokerSentinel(fake_redis)
    fake_redis.lpush("pocoflow", "a message")  # a fresh broker with a backlog: no loss
    assert not sentinel.lost()
    assert not sweeper.BrokerSentinel(fake_redis).lost()  # the key is set now
    fake_redis.flushdb()
    assert sentinel.lost()
    assert not sweeper.BrokerSentinel(fake_redis).lost()  # another sweeper: already on it
    sentinel.set()
    assert not sentinel.lost()


def test_a_loss_is_seen_though_a_new_message_was_reserved_since(fake_redis: Any) -> None:
    """Redis restarted empty, then a worker prefetched one new message (kombu's
    ``unacked`` hash): a first look must still call it a loss, or it would set the key
    and hide the loss from every sweeper (a duplicate of the new message is harmless, the
    claim refuses it)."""
    seen_before = sweeper.BrokerSentinel(fake_redis)
    seen_before.set()
    assert not seen_before.lost()
    fake_redis.flushall()
    fake_redis.hset("unacked", "tag-of-a-new-message", "a message")
    assert sweeper.BrokerSentinel(fake_redis).lost()  # a worker started meanwhile


def test_a_first_look_at_an_empty_broker_without_sentinel_is_a_loss(fake_redis: Any) -> None:
    """Queued steps in the ledger, nothing in the broker, never marked: their messages
    are gone (a broker restarted empty before any worker looked)."""
    assert sweeper.BrokerSentinel(fake_redis).lost(lambda: ["pocoflow", "gpu"])


def test_queues_in_use_names_the_queues_of_queued_steps(db: Any) -> None:
    submitted(db, queue="gpu")
    submitted(db)
    assert liveness.queues_in_use(db, "pocoflow") == ["gpu", "pocoflow"]


def test_heartbeats_use_the_database_clock(db: Any) -> None:
    liveness.record_beat(db, "host:41", "host", 41)
    (row,) = db._read(lambda conn: list(conn.execute(liveness.pf_workers.select()).mappings()))
    clock = db.clock()
    assert clock - 5 < row["beat_at"] <= clock
    assert liveness.live_workers(db, DEAD_AFTER_S) == 1
    assert liveness.live_workers(db, DEAD_AFTER_S, now=row["beat_at"] + DEAD_AFTER_S + 1) == 0
    liveness.record_stop(db, "host:41")  # a clean stop: dead at once
    assert liveness.live_workers(db, DEAD_AFTER_S) == 0
    assert liveness.prune_workers(db, 3600) == 1


@pytest.fixture
def fake_redis() -> Any:
    import fakeredis

    return fakeredis.FakeRedis()


def test_the_heartbeat_thread_records_what_its_process_holds(db: Any) -> None:
    from pocoflow.distributed import liveness as process_liveness
    from tests.helpers import wait_until

    first, t0 = submitted(db)
    db.mark_sent(first.run_id, 0, 1, now=t0)
    held = {(first.run_id, 0, 1)}
    heartbeat = process_liveness.ensure(db, "host:51", 0.2, held=lambda: held)
    try:
        assert liveness.live_workers(db, DEAD_AFTER_S) == 1  # first beat before returning
        wait_until(lambda: db.get_step(first.run_id, 0)["received_by"] == "host:51", 10)
    finally:
        process_liveness.stop(heartbeat)
    assert liveness.live_workers(db, DEAD_AFTER_S) == 0  # a clean stop buries the row
    report = swept(db, Sent(db), t0 + 0.5)
    assert report.resent == [(first.run_id, 0)]


def test_a_clean_stop_lands_after_a_beat_under_way(
    db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A beat that lands after the stop makes the stopped process look alive again (the
    sweeper then leaves what it held for 3 beats) and writes to a ledger its owner may
    have closed (a benchmark's temp dir was deleted under it): the stop waits for it."""
    from pocoflow.distributed import liveness as process_liveness

    written: list[str] = []
    beating, release, stopped = threading.Event(), threading.Event(), threading.Event()

    def slow_beat(*_: Any, **__: Any) -> None:
        beating.set()
        release.wait(10)
        written.append("beat")

    def stop_row(*_: Any, **__: Any) -> None:
        written.append("stop")
        stopped.set()

    monkeypatch.setattr(liveness, "record_beat", slow_beat)
    monkeypatch.setattr(liveness, "record_stop", stop_row)
    heartbeat = process_liveness.Heartbeat(db, "host:53", 0.01)
    heartbeat._thread.start()
    assert beating.wait(10)
    stopping = threading.Thread(target=heartbeat.stop)
    stopping.start()
    # Bounded look that the stop is still waiting (a stop that did not wait is done).
    assert not stopped.wait(0.5), "the stop was written while a beat was under way"
    release.set()
    stopping.join(10)
    assert written == ["beat", "stop"]


def test_a_message_that_left_a_live_process_unstarted_is_unmarked(db: Any) -> None:
    """A worker's main process held a step's message (marked), then lost it inside the
    process (handed to a pool child that died before its claim) and lives on. The mark
    goes at its next look, so once the lease runs out the sweeper sends the step again
    while the broker is idle, instead of taking it for held by that live process until
    the queue backstop (a CI run waited past 60 s on that)."""
    from pocoflow.distributed import liveness as process_liveness
    from tests.helpers import wait_until

    first, t0 = submitted(db)
    db.mark_sent(first.run_id, 0, 1, now=t0)
    held = {(first.run_id, 0, 1)}
    heartbeat = process_liveness.ensure(db, "host:52", 0.2, held=lambda: set(held))
    try:
        wait_until(lambda: db.get_step(first.run_id, 0)["received_by"] == "host:52", 10)
        held.clear()  # gone from the process's hands, never claimed
        wait_until(lambda: db.get_step(first.run_id, 0)["received_by"] is None, 10)
        sent = Sent(db)
        lease_over = db.get_step(first.run_id, 0)["lease_expires_at"] + 0.1
        liveness.record_beat(db, "host:52", "host", 52, now=lease_over)  # alive
        report = sweep(
            db, sent, lease_s=LONG_LEASE_S, now=lease_over, sentinel=IdleBroker(),
            dead_after_s=DEAD_AFTER_S,
        )  # fmt: skip
        assert report.resent == [(first.run_id, 0)]
    finally:
        process_liveness.stop(heartbeat)


def test_a_released_mark_of_another_worker_or_a_started_step_stays(db: Any) -> None:
    first, t0 = submitted(db)
    second, _ = submitted(db)
    for run in (first, second):
        db.mark_sent(run.run_id, 0, 1, now=t0)
    liveness.record_beat(db, "host:61", "host", 61, [(first.run_id, 0, 1)], now=t0)
    liveness.record_beat(db, "host:62", "host", 62, [(second.run_id, 0, 1)], now=t0)
    # host:61 releases both: its own mark goes, host:62's stays.
    keys = [(first.run_id, 0, 1), (second.run_id, 0, 1)]
    liveness.record_beat(db, "host:61", "host", 61, released=keys, now=t0 + 1)
    assert db.get_step(first.run_id, 0)["received_by"] is None
    assert db.get_step(second.run_id, 0)["received_by"] == "host:62"


def test_a_release_of_an_older_attempt_or_another_workers_mark_leaves_it(db: Any) -> None:
    first, t0 = submitted(db)
    db.mark_sent(first.run_id, 0, 1, now=t0)
    liveness.record_beat(db, "host:71", "host", 71, [(first.run_id, 0, 1)], now=t0)
    liveness.record_beat(db, "host:71", "host", 71, released=[(first.run_id, 0, 2)], now=t0)
    liveness.record_beat(db, "host:72", "host", 72, released=[(first.run_id, 0, 1)], now=t0)
    assert db.get_step(first.run_id, 0)["received_by"] == "host:71"


def test_a_release_of_twenty_thousand_keys_is_one_beat_that_lands(db: Any) -> None:
    """A process may let go of tens of thousands of messages at once (countdown retries
    of a big map): a statement holds at most 65,535 parameters, and a beat that failed
    on it would fail at every try after, until the live worker was taken for dead."""
    first, t0 = submitted(db)
    db.mark_sent(first.run_id, 0, 1, now=t0)
    liveness.record_beat(db, "host:73", "host", 73, [(first.run_id, 0, 1)], now=t0)
    keys: list[tuple[Any, ...]] = [(first.run_id, 0, 1)]
    keys += [(f"gone-{n}", 0, 1) for n in range(20_000)]
    keys += [(f"gone-{n}", 0, n, 1) for n in range(20_000)]
    liveness.record_beat(db, "host:73", "host", 73, released=keys, now=t0 + 1)
    assert db.get_step(first.run_id, 0)["received_by"] is None


def test_a_failed_look_unmarks_nothing_and_a_failed_beat_keeps_its_release(db: Any) -> None:
    """A look that fails says nothing about what the process holds: read as an empty set
    it would unmark messages still held, and a sweep would send them again. A release
    whose beat failed goes with the next beat."""
    from pocoflow.distributed import liveness as process_liveness
    from tests.helpers import wait_until

    first, t0 = submitted(db)
    db.mark_sent(first.run_id, 0, 1, now=t0)
    key = (first.run_id, 0, 1)
    looks = {"fail": False, "held": {key}}
    fails_left = {"beats": 0}

    def held() -> set[Any]:
        if looks["fail"]:
            raise RuntimeError("the sets kept changing")
        return set(looks["held"])

    heartbeat = process_liveness.ensure(db, "host:74", 0.05, held=held)
    real_beat = heartbeat.beat

    def flaky_beat(*args: Any, **kwargs: Any) -> bool:
        if fails_left["beats"] > 0:
            fails_left["beats"] -= 1
            return False
        return real_beat(*args, **kwargs)

    heartbeat.beat = flaky_beat  # type: ignore[method-assign]
    try:
        wait_until(lambda: db.get_step(first.run_id, 0)["received_by"] == "host:74", 10)
        looks["fail"] = True
        beats = liveness.last_beats(db)["host:74"]
        wait_until(lambda: liveness.last_beats(db)["host:74"] > beats + 0.2, 10)  # beats on
        assert db.get_step(first.run_id, 0)["received_by"] == "host:74"
        fails_left["beats"] = 3
        looks["fail"], looks["held"] = False, set()
        wait_until(lambda: db.get_step(first.run_id, 0)["received_by"] is None, 10)
        assert fails_left["beats"] == 0  # it went out after the failed beats
    finally:
        process_liveness.stop(heartbeat)


def test_a_stale_mark_of_a_live_worker_holds_its_step_only_until_the_cap(db: Any) -> None:
    """A mark nobody clears (its process lost the message and failed to say so) holds a
    queued step while the broker is idle, but not past ``REQUEUE_CAP_S``."""
    first, t0 = submitted(db)
    db.mark_sent(first.run_id, 0, 1, now=t0)
    liveness.record_beat(db, "host:75", "host", 75, [(first.run_id, 0, 1)], now=t0)
    queued_at = db.get_step(first.run_id, 0)["queued_at"]
    sent = Sent(db)
    for now in (queued_at + LONG_LEASE_S + 1, queued_at + sweeper.REQUEUE_CAP_S + 1):
        liveness.record_beat(db, "host:75", "host", 75, now=now)  # alive throughout
        report = sweep(
            db, sent, lease_s=LONG_LEASE_S, now=now, sentinel=IdleBroker(),
            dead_after_s=DEAD_AFTER_S,
        )  # fmt: skip
    assert report.resent == [(first.run_id, 0)]
    assert len(sent.messages) == 1  # at the cap, not before


def test_celery_held_lists_prefetched_and_countdown_messages_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from celery.worker import state

    from pocoflow.distributed.celery_app import TASK_NAME
    from pocoflow.distributed.liveness import celery_held

    class Request:
        """As Celery's: ``name`` is the message's shadow (display) name if it has one,
        ``task`` the task that will run."""

        def __init__(self, body: Any, name: str = TASK_NAME, shadow: str | None = None) -> None:
            self.task = type("Task", (), {"name": name})()
            self.name, self.args = shadow or name, [body]

    waiting = Request({"run_id": "r", "step": 1, "attempt": 2}, shadow="flow.node")
    running = Request({"run_id": "r", "step": 0, "attempt": 1})
    countdown = Request({"run_id": "s", "step": 3, "attempt": 4})
    other = Request({"run_id": "t", "step": 0, "attempt": 1}, name="other.task")
    garbled = Request("not a dict")
    monkeypatch.setattr(state, "reserved_requests", {waiting, running, other, garbled})
    monkeypatch.setattr(state, "active_requests", {running})
    monkeypatch.setattr(state, "scheduled_requests", {countdown})
    assert celery_held(TASK_NAME)() == {("r", 1, 2), ("s", 3, 4)}


def test_a_sweeper_whose_clock_runs_ahead_declares_no_live_worker_dead(
    db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    first, t0 = submitted(db)
    db.mark_sent(first.run_id, 0, 1, now=t0)
    assert db.claim_step(first.run_id, 0, 1, "host:61", 7200.0, now=t0)
    liveness.record_beat(db, "host:61", "host", 61)  # on the database's clock
    real = time.time
    monkeypatch.setattr(sweeper.time, "time", lambda: real() + 3600)  # an hour ahead
    report = sweep(db, Sent(db), lease_s=7200.0, dead_after_s=DEAD_AFTER_S)
    assert not report.taken_over


def test_a_step_due_for_a_resend_waits_while_the_broker_has_messages(
    db: Any, fake_redis: Any
) -> None:
    first, t0 = submitted(db)
    db.mark_sent(first.run_id, 0, 1, now=t0)
    sentinel = sweeper.BrokerSentinel(fake_redis)
    sentinel.set()
    fake_redis.lpush("pocoflow", "a message ahead of ours")
    sent = Sent(db)
    due = t0 + sweeper.REQUEUE_AFTER_S + 0.1
    assert not swept(db, sent, due, sentinel=sentinel)  # the backlog is still draining
    fake_redis.delete("pocoflow")
    later = due + sweeper.REQUEUE_AFTER_S + 0.1
    assert swept(db, sent, later, sentinel=sentinel).resent == [(first.run_id, 0)]
    # Under constant load a loss is still found, after REQUEUE_CAP_S.
    fake_redis.lpush("pocoflow", "more work")
    capped = later + sweeper.REQUEUE_CAP_S + 0.1
    assert swept(db, sent, capped, sentinel=sentinel).resent == [(first.run_id, 0)]


def test_workers_silent_only_while_the_ledger_was_down_keep_their_steps(
    db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ledger outage longer than ``dead_after`` silences every heartbeat; the sweeper
    that meets the ledger again must not declare the workers dead before they can beat
    (each take-over would also count as a crash toward the poison limit). A worker still
    silent a ``dead_after`` after the ledger answers again is dead as usual."""
    alive, _ = submitted(db)
    dead, _ = submitted(db)
    old_beat = db.clock() - 10.0  # the last beat before the outage
    for run, worker in ((alive, "host:41"), (dead, "host:42")):
        db.mark_sent(run.run_id, 0, 1)
        assert db.claim_step(run.run_id, 0, 1, worker, LONG_LEASE_S)
        liveness.record_beat(db, worker, "host", 41, now=old_beat)
    down = threading.Event()
    down.set()
    calls = {"failed": 0, "ok": 0}
    real_sweep = sweeper.sweep

    def sweep_unless_down(*args: Any, **kw: Any) -> sweeper.SweepReport:
        if down.is_set():
            calls["failed"] += 1
            raise OperationalError("SELECT 1", None, Exception("ledger unreachable"))
        report = real_sweep(*args, **kw)
        calls["ok"] += 1
        return report

    monkeypatch.setattr(sweeper, "sweep", sweep_unless_down)
    sent = Sent(db)
    thread = sweeper.SweeperThread(
        lambda: db, lambda: sent, lease_s=LONG_LEASE_S, interval_s=0.02, dead_after_s=1.0
    )
    thread.start()
    try:
        wait_until(lambda: calls["failed"] >= 2, timeout=10)
        down.clear()  # the ledger is back; the live worker beats as soon as it can
        wait_until(lambda: calls["ok"] >= 1, timeout=10)

        def live_beats_and_dead_is_taken_over() -> bool:
            liveness.record_beat(db, "host:41", "host", 41)
            return db.get_step(dead.run_id, 0)["attempt"] == 2

        wait_until(live_beats_and_dead_is_taken_over, timeout=10)
    finally:
        thread.stop()
    step = db.get_step(alive.run_id, 0)
    assert (step["status"], step["attempt"], step["lease_owner"]) == ("running", 1, "host:41")
    assert [a["outcome"] for a in db.get_attempts(alive.run_id)] == [None]
    assert [m.run_id for m, _ in sent.messages] == [dead.run_id]


class Countdowns(Sent):
    """``Sent``, also keeping each message's countdown (None: sent for now)."""

    def __init__(self, db: Any) -> None:
        super().__init__(db)
        self.countdowns: list[float | None] = []

    def __call__(self, message: Any, queue: str | None = None, **kw: Any) -> bool:
        self.countdowns.append(kw.get("countdown"))
        return super().__call__(message, queue)


BACKOFF_S = 30.0


def retry_waiting(db: Any) -> tuple[str, float]:
    """A run whose step 0 failed a try at the returned time and waits ``BACKOFF_S`` for
    its retry, attempt 2, sent with that countdown (what ``executor._retry`` writes)."""
    run, t0 = submitted(db)
    db.mark_sent(run.run_id, 0, 1, now=t0)
    assert db.claim_step(run.run_id, 0, 1, "host:51", LONG_LEASE_S, now=t0)
    lease = LONG_LEASE_S + BACKOFF_S
    assert db.take_over(run.run_id, 0, 1, lease, now=t0, holder="host:51", due_in=BACKOFF_S) == 2
    db.mark_sent(run.run_id, 0, 2, now=t0)
    return run.run_id, t0


def test_a_retry_sent_again_after_a_broker_loss_keeps_its_backoff(db: Any) -> None:
    _, t0 = retry_waiting(db)
    sent = Countdowns(db)
    report = swept(db, sent, t0 + 10, sentinel=LostOnce())
    assert report.bulk_resent == 1
    assert [m.attempt for m, _ in sent.messages] == [2]
    assert sent.countdowns == [pytest.approx(BACKOFF_S - 10, abs=0.01)]


def test_a_retry_a_dead_worker_held_is_sent_again_with_its_backoff(db: Any) -> None:
    run_id, t0 = retry_waiting(db)
    liveness.record_beat(db, "host:52", "host", 52, [(run_id, 0, 2)], now=t0)  # prefetched
    sent = Countdowns(db)
    now = t0 + DEAD_AFTER_S + 0.1
    assert swept(db, sent, now).resent == [(run_id, 0)]
    assert sent.countdowns == [pytest.approx(BACKOFF_S - DEAD_AFTER_S - 0.1, abs=0.01)]
    # The lease still covers the wait: no sweep re-sends it before the retry is due.
    assert db.get_step(run_id, 0)["lease_expires_at"] >= t0 + LONG_LEASE_S + BACKOFF_S - 0.01


def test_a_dead_worker_is_found_by_the_holder_tokens_of_its_claims(db: Any) -> None:
    """Workers claim with holder tokens ``<worker id>#<n>`` (one per delivery): the
    step is the worker's, whatever ``n``; a worker whose id only begins the same is not
    its owner."""
    run, t0 = submitted(db)
    other, _ = submitted(db)
    for r, worker, holder in ((run, "host:61", "host:61#7"), (other, "host:612", "host:612#1")):
        db.mark_sent(r.run_id, 0, 1, now=t0)
        assert db.claim_step(r.run_id, 0, 1, worker, LONG_LEASE_S, now=t0, holder=holder)
    liveness.record_beat(db, "host:61", "host", 61, now=t0)  # dies after this beat
    liveness.record_beat(db, "host:6", "host", 6, now=t0)  # dead too, a prefix of both
    liveness.record_beat(db, "host:612", "host", 612, now=t0 + DEAD_AFTER_S)  # alive
    report = swept(db, Sent(db), t0 + DEAD_AFTER_S + 0.1)
    assert report.taken_over == [(run.run_id, 0, 2)]
    assert db.get_step(other.run_id, 0)["lease_owner"] == "host:612#1"


def test_a_resumed_poison_step_gets_its_crash_budget_afresh(db: Any) -> None:
    """The poison verdict ends the step for good: once the node is fixed and the run
    resumed, one crash (a deploy, the OOM killer elsewhere) is one crash of a new start,
    not the fourth of the old one (what the error message promises)."""
    from pocoflow.distributed import lifecycle

    poison, t0 = submitted(db)
    run_id = poison.run_id
    db.mark_sent(run_id, 0, 1, now=t0)
    sent = Sent(db)
    for crash in range(1, 4):
        t = t0 + 10 * crash
        worker = f"host:{200 + crash}"
        assert db.claim_step(run_id, 0, crash, worker, LONG_LEASE_S, now=t)
        liveness.record_beat(db, worker, "host", 200 + crash, now=t)
        report = swept(db, sent, t + DEAD_AFTER_S + 0.1, max_crashes=3)
    assert report.poisoned == [(run_id, 0)]
    assert lifecycle.restart(db, run_id, sent, lease_s=LONG_LEASE_S)  # type: ignore[arg-type]
    resumed = db.get_step(run_id, 0)["attempt"]
    t = t0 + 50
    assert db.claim_step(run_id, 0, resumed, "host:204", LONG_LEASE_S, now=t)
    liveness.record_beat(db, "host:204", "host", 204, now=t)
    report = swept(db, sent, t + DEAD_AFTER_S + 0.1, max_crashes=3)
    assert report.taken_over == [(run_id, 0, resumed + 1)] and not report.poisoned
    assert db.get_run(run_id)["status"] == "running"


def test_attempts_lost_while_their_worker_beat_on_are_not_crashes(db: Any) -> None:
    """A lease that ran out while its worker kept beating (a connection killed mid-commit
    ended the delivery) is taken over, but says nothing about the node: four such
    take-overs poison nothing (pg_terminate_backend under load used to fail healthy
    runs this way)."""
    first, t0 = submitted(db)
    run_id = first.run_id
    db.mark_sent(run_id, 0, 1, now=t0)
    sent = Sent(db)
    short_lease = 2.0
    for attempt in range(1, 5):
        t = t0 + 100 * attempt
        worker = f"host:{200 + attempt}"
        assert db.claim_step(run_id, 0, attempt, worker, short_lease, now=t)
        later = t + short_lease + 0.5
        liveness.record_beat(db, worker, "host", 200 + attempt, now=later)  # alive
        report = sweep(
            db, sent, lease_s=short_lease, now=later + 0.1, dead_after_s=DEAD_AFTER_S, max_crashes=3
        )
        assert report.taken_over == [(run_id, 0, attempt + 1)] and not report.poisoned
    assert db.get_run(run_id)["status"] in ("queued", "running")
    assert liveness.crashes(db.get_attempts(run_id), 0)[0] == 0


def test_a_lease_that_ran_out_with_its_process_silent_is_a_crash(db: Any) -> None:
    """The lease pass can beat the heartbeat pass to a dead process (a lease shorter than
    dead_after): the attempt still counts as a crash when the process missed beats."""
    first, t0 = submitted(db)
    run_id = first.run_id
    db.mark_sent(run_id, 0, 1, now=t0)
    assert db.claim_step(run_id, 0, 1, "host:301", 2.0, now=t0)
    liveness.record_beat(db, "host:301", "host", 301, now=t0)  # then silent
    report = sweep(db, Sent(db), lease_s=2.0, now=t0 + 2.1, dead_after_s=DEAD_AFTER_S)
    assert report.taken_over == [(run_id, 0, 2)]
    assert liveness.crashes(db.get_attempts(run_id), 0)[0] == 1


def test_only_attempts_lost_with_their_worker_process_count_as_crashes() -> None:
    def row(attempt: int, died: bool) -> dict[str, Any]:
        why = liveness.WORKER_DIED if died else "late commit refused"
        return {"step": 0, "attempt": attempt, "outcome": "lost", "error_msg": why}

    assert liveness.crashes([row(1, False), row(2, False), row(3, False)], 0) == (0, 0)
    assert liveness.crashes([row(1, True), row(2, False), row(3, True)], 0) == (2, 0)
    # Two deliveries of attempt 3 in the dead process: one crash, not two.
    assert liveness.crashes([row(1, True), row(2, False), row(3, True), row(3, True)], 0) == (2, 0)


def test_crashes_count_only_in_a_row_and_since_the_last_resume() -> None:
    """An outcome of the node's own (a retry) ends a row of crashes; a resume (its
    ``resumed`` row) starts both counts afresh; a row lost while its worker lived on
    neither counts nor ends the row."""

    def row(attempt: int, outcome: str, why: str | None = None) -> dict[str, Any]:
        return {"step": 0, "attempt": attempt, "outcome": outcome, "error_msg": why}

    crashed = liveness.EXECUTOR_CRASHED
    died = ("lost", liveness.WORKER_DIED)
    rows = [row(1, crashed), row(2, "retry"), row(3, crashed)]
    assert liveness.crashes(rows, 0) == (1, 1)
    rows = [row(1, crashed), row(2, *died), row(3, "lost", "late commit refused"), row(4, crashed)]
    assert liveness.crashes(rows, 0) == (3, 0)
    rows = [row(1, "retry"), row(2, crashed), row(2, liveness.RESUMED_OUTCOME), row(3, crashed)]
    assert liveness.crashes(rows, 0) == (1, 0)


def test_executor_crashes_fail_a_run_only_across_two_workers_or_every_live_one() -> None:
    assert not liveness.spans_enough_workers({"a"}, 2)
    assert not liveness.spans_enough_workers({"a"}, 5)
    assert liveness.spans_enough_workers({"a", "b"}, 2)
    assert liveness.spans_enough_workers({"a", "b"}, 5)
    assert liveness.spans_enough_workers({"a"}, 1)  # the only worker alive
    assert liveness.spans_enough_workers({"a"}, 0)  # none heard from: in-process


def test_a_poison_verdict_after_a_mix_of_crashes_says_which_were_which(db: Any) -> None:
    """One crash in the executor, then two deaths of the worker: the verdict does not
    say the step was lost with its worker 3 times."""
    poison, t0 = submitted(db)
    run_id = poison.run_id
    db.mark_sent(run_id, 0, 1, now=t0)
    assert db.claim_step(run_id, 0, 1, "host:100", LONG_LEASE_S, now=t0, holder="host:100#1")
    db.end_attempt(run_id, 0, 1, "host:100", liveness.EXECUTOR_CRASHED, "CodecError: x")
    assert db.take_over(run_id, 0, 1, LONG_LEASE_S, now=t0 + 1, force=True) == 2
    sent = Sent(db)
    for attempt in (2, 3):
        t = t0 + 10 * attempt
        worker = f"host:{100 + attempt}"
        assert db.claim_step(run_id, 0, attempt, worker, LONG_LEASE_S, now=t)
        liveness.record_beat(db, worker, "host", 100 + attempt, now=t)
        report = swept(db, sent, t + DEAD_AFTER_S + 0.1, max_crashes=3)
    assert report.poisoned == [(run_id, 0)]
    error = db.get_run(run_id)["error_msg"]
    assert "crashed 3 times in a row (2 with its worker process dying, 1 in the executor)" in error
