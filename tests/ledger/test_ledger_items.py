"""Map items in the ledger, on SQLite and PostgreSQL: fan-out, fenced item claims and
commits, the join counter (exactly one commit completes it, even racing), retries,
failures, re-opening after a resume, and the sweeper's queries."""

from __future__ import annotations

import threading

import pytest

from pocoflow.commit import PARKED_OWNER
from pocoflow.ledger.items import ItemClaim

pytestmark = pytest.mark.ledger

LEASE = 10.0
RUN = "r1"


@pytest.fixture
def fanned(db):
    """Run r1 whose step 0 (node M) was claimed by h0 and fanned out into 3 items."""
    db.create_run(RUN, "f", initial_store={"n": 0}, status="running")
    db.insert_step(RUN, 0, "M", lease_s=LEASE)
    assert db.claim_step(RUN, 0, 1, "w0", LEASE, holder="w0#1")
    start = [{"event": "node_start", "step": 0, "node_name": "M"}]
    assert db.fan_out(RUN, 0, 1, "w0#1", "w0", ['"a"', '"b"', '"c"'], start, now=90.0)
    return db


def _c(idx, holder="w1#1", attempt=1):
    return ItemClaim(RUN, 0, idx, attempt, holder)


def _claim(db, idx, holder="w1#1", attempt=1, node="M", now=None):
    return db.claim_item(_c(idx, holder, attempt), node, LEASE, now=now)


def _commit(db, idx, holder="w1#1", attempt=1, result='"R"'):
    return db.commit_item(_c(idx, holder, attempt), result_json=result, lease_s=LEASE)


def test_fan_out_parks_the_step_and_writes_items_and_join(fanned):
    db = fanned
    step = db.get_step(RUN, 0)
    assert (step["status"], step["lease_owner"], step["lease_expires_at"]) == (
        "running",
        PARKED_OWNER,
        None,
    )
    rows = db.get_items(RUN, 0)
    assert [(r["idx"], r["item_json"], r["status"], r["attempt"]) for r in rows] == [
        (0, '"a"', "queued", 1),
        (1, '"b"', "queued", 1),
        (2, '"c"', "queued", 1),
    ]
    join = db.get_join(RUN, 0)
    assert (join["done"], join["total"]) == (0, 3)
    (attempt,) = db.get_attempts(RUN)
    assert attempt["outcome"] == "fanned_out"
    # A copy of the step message cannot claim the parked step and run prep again.
    assert db.claim_step(RUN, 0, 1, "w9", LEASE, holder="w9#1") is False
    assert [e["event"] for e in db.get_events(RUN)] == ["node_start"]


def test_fan_out_needs_the_step_claim(db):
    db.create_run(RUN, "f", initial_store={}, status="running")
    db.insert_step(RUN, 0, "M", lease_s=LEASE)
    assert db.claim_step(RUN, 0, 1, "w0", LEASE, holder="w0#1")
    assert db.fan_out(RUN, 0, 1, "w0#2", "w0", ['"a"'], []) is False  # not the holder
    assert db.get_join(RUN, 0) is None and db.get_items(RUN, 0) == []


def test_item_claim_commit_and_the_join(fanned):
    db = fanned
    claimed, run, item = _claim(db, 0)
    assert claimed and run["status"] == "running" and item == ('"a"', 1)
    assert _claim(db, 0, holder="w2#1")[0] is False  # held under a live lease
    assert _claim(db, 1, attempt=2)[0] is False  # stale attempt
    assert _claim(db, 1, holder="w1#2", node="X")[0] is False  # another node
    ok, state = _commit(db, 0)
    assert ok and (state["done"], state["total"]) == (1, 3)
    assert state["step_status"] == "running"  # not complete: the step stays parked
    for idx in (1, 2):
        assert _claim(db, idx)[0]
    assert _commit(db, 1)[1]["done"] == 2
    ok, state = _commit(db, 2, result='"last"')
    assert (state["done"], state["total"], state["step_status"]) == (3, 3, "queued")
    assert state["step_attempt"] == 2 and state["node_id"] == "M"
    step = db.get_step(RUN, 0)
    assert step["sent_at"] is None and step["lease_owner"] is None  # the join's outbox row
    # The join message (attempt 2) claims the step as any step message does.
    assert db.claim_step(RUN, 0, 2, "w3", LEASE, holder="w3#1")
    assert [r["result_json"] for r in db.get_items(RUN, 0)] == ['"R"', '"R"', '"last"']


def test_a_stale_holders_commit_is_refused(fanned):
    db = fanned
    assert _claim(db, 0)[0]
    assert db.take_over_item(RUN, 0, 0, 1, "w1#1") == 2  # the sweeper: holder is dead
    assert _claim(db, 0, holder="w2#1", attempt=2)[0]
    assert _commit(db, 0) == (False, None)  # the old holder wakes up: nothing lands
    assert db.renew_item_lease(_c(0), LEASE) is False
    assert db.get_join(RUN, 0)["done"] == 0
    assert _commit(db, 0, holder="w2#1", attempt=2)[0]
    assert _commit(db, 0, holder="w2#1", attempt=2)[0] is False  # counted once
    assert db.get_join(RUN, 0)["done"] == 1


def test_concurrent_last_commits_complete_the_join_exactly_once(db):
    """Two items commit at once, each the possible last: the counter lets one see it."""
    db.create_run(RUN, "f", initial_store={}, status="running")
    db.insert_step(RUN, 0, "M", lease_s=LEASE)
    db.claim_step(RUN, 0, 1, "w0", LEASE, holder="w0#1")
    db.fan_out(RUN, 0, 1, "w0#1", "w0", ['"a"', '"b"'], [])
    for idx in (0, 1):
        assert _claim(db, idx, holder=f"w{idx}#1")[0]
    barrier = threading.Barrier(2)
    states: list = [None, None]

    def commit(idx: int) -> None:
        barrier.wait()
        states[idx] = _commit(db, idx, holder=f"w{idx}#1")

    threads = [threading.Thread(target=commit, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(s[0] for s in states)
    completing = [s for _, s in states if s["done"] == s["total"]]
    assert len(completing) == 1
    step = db.get_step(RUN, 0)
    assert (step["status"], step["attempt"]) == ("queued", 2)  # re-queued once
    join = db.get_join(RUN, 0)
    assert (join["done"], join["total"]) == (2, 2)


def test_the_join_row_is_unique(fanned):
    db = fanned
    from sqlalchemy.exc import IntegrityError

    from pocoflow.ledger import items

    ops = items.fan_out_ops(RUN, 0, 1, "w0#1", "w0", ['"x"'], [], None, None)  # type: ignore[arg-type]
    with pytest.raises(IntegrityError):
        db._write(lambda conn: conn.execute(ops[1].stmt, ops[1].params), "dup join", RUN)
    assert db.get_join(RUN, 0)["total"] == 3


def test_retry_is_a_new_attempt_due_later(fanned):
    db = fanned
    assert _claim(db, 1)[0]
    assert db.retry_item(_c(1), next_try=2, due_in=5.0, now=100.0) == 2
    row = db.get_item(RUN, 0, 1)
    assert (row["status"], row["attempt"], row["try_number"], row["queued_at"]) == (
        "queued",
        2,
        2,
        105.0,
    )
    assert [r["idx"] for r in db.unsent_items(1.0, 3.0, now=104.0)] == [0, 2]
    assert [r["idx"] for r in db.unsent_items(1.0, 3.0, now=107.0)] == [0, 1, 2]
    db.mark_items_sent([(RUN, 0, 0, 1), (RUN, 0, 1, 2), (RUN, 0, 2, 1)])
    assert db.unsent_items(0.0, 3.0, now=1e12) == []
    claimed, _, item = _claim(db, 1, holder="w2#1", attempt=2)
    assert claimed and item == ('"b"', 2)


def test_failed_item_fails_the_run_and_a_reopen_runs_it_again(fanned):
    db = fanned
    assert _claim(db, 0)[0] and _commit(db, 0)[0]
    assert _claim(db, 2)[0]
    events = [{"event": "node_error", "step": 0, "node_name": "M", "error_msg": "item 2"}]
    assert db.fail_item(
        _c(2),
        error_json='{"type": "ValueError", "message": "no"}',
        error_msg="MapNode 'M': item 2 failed",
        events=events,
    )
    run = db.get_run(RUN)
    assert run["status"] == "failed" and "item 2" in run["error_msg"]
    assert _claim(db, 1)[0] is False  # the run stopped: no more items start
    # A resume takes the step over and its claim re-opens the unfinished items.
    db.update_run(RUN, status="running", error_msg=None)
    assert db.take_over(RUN, 0, 1, LEASE, force=True) == 2
    assert db.claim_step(RUN, 0, 2, "w5", LEASE, holder="w5#1")
    state, todo = db.reopen_items(RUN, 0, 2, "w5#1", "w5")
    assert (state["done"], state["total"]) == (1, 3)
    assert [(r["idx"], r["attempt"], r["try_number"]) for r in todo] == [(1, 2, 1), (2, 2, 1)]
    assert db.get_step(RUN, 0)["lease_owner"] == PARKED_OWNER  # parked again
    assert db.get_item(RUN, 0, 0)["status"] == "done"  # finished items stay done


def test_reopen_of_a_complete_join_hands_it_to_the_claimer(fanned):
    db = fanned
    for idx in range(3):
        assert _claim(db, idx)[0] and _commit(db, idx)[0]
    assert db.claim_step(RUN, 0, 2, "w5", LEASE, holder="w5#1")
    state, todo = db.reopen_items(RUN, 0, 2, "w5#1", "w5")
    assert state["done"] == state["total"] == 3 and todo == []
    assert db.get_step(RUN, 0)["lease_owner"] == "w5#1"  # still held: it joins


def test_orphans_dead_holders_expired_leases_and_dead_receivers(fanned):
    from pocoflow.ledger.liveness import record_beat

    db = fanned
    record_beat(db, "wdead", "h", 1, now=100.0)
    record_beat(db, "walive", "h", 2, now=200.0)
    assert _claim(db, 0, holder="wdead#1", now=195.0)[0]
    assert _claim(db, 1, holder="walive#1", now=195.0)[0]
    assert db.orphaned_items(dead_after_s=3.0, now=201.0) != []
    found = {r["idx"]: r for r in db.orphaned_items(dead_after_s=3.0, now=201.0)}
    assert set(found) == {0}  # dead holder; the live one's lease lasts until 205
    assert {r["idx"] for r in db.orphaned_items(dead_after_s=3.0, now=206.0)} == {0, 1}
    assert found[0]["flow_name"] == "f" and found[0]["node_id"] == "M"
    assert db.take_over_item(RUN, 0, 0, 1, "wdead#1") == 2
    assert db.take_over_item(RUN, 0, 0, 1, "wdead#1") is None  # one sweeper wins


def test_stranded_join_is_found_and_requeued(fanned):
    db = fanned
    assert db.stranded_joins() == []
    db._write(
        lambda conn: conn.exec_driver_sql("UPDATE pf_joins SET done = total WHERE run_id = 'r1'"),
        "test",
        RUN,
    )
    assert db.stranded_joins() == [{"run_id": RUN, "step": 0}]
    state = db.requeue_join(RUN, 0, LEASE)
    assert state["step_status"] == "queued" and state["step_attempt"] == 2
    assert db.requeue_join(RUN, 0, LEASE) is None


class _Published:
    """A publisher double: records messages, marks items sent as the real one does."""

    def __init__(self, db) -> None:
        self.db = db
        self.messages: list = []

    def __call__(self, message, queue=None, **_) -> bool:
        from pocoflow.distributed.message import ItemMessage

        self.messages.append(message)
        if isinstance(message, ItemMessage):
            self.db.mark_items_sent([message.key])
        return True


def test_sweep_sends_unsent_items_and_takes_over_a_dead_holders(fanned):
    from pocoflow.distributed.message import ItemMessage
    from pocoflow.distributed.sweeper import sweep
    from pocoflow.ledger.liveness import record_beat

    db = fanned
    publish = _Published(db)
    clock = db.clock()
    report = sweep(db, publish, lease_s=LEASE, now=clock + 5, dead_after_s=3.0)
    # The fan-out's messages were never published: all three are sent once.
    assert sorted(report.items) == [(RUN, 0, 0), (RUN, 0, 1), (RUN, 0, 2)]
    assert all(isinstance(m, ItemMessage) and m.attempt == 1 for m in publish.messages)
    assert sweep(db, publish, lease_s=LEASE, now=clock + 6, dead_after_s=3.0).items == []
    # A worker claims item 1 and dies (its heartbeat stops).
    record_beat(db, "wdead", "h", 1, now=clock)
    assert _claim(db, 1, holder="wdead#1", now=clock)[0]
    report = sweep(db, publish, lease_s=LEASE, now=clock + 5, dead_after_s=3.0)
    assert report.items == [(RUN, 0, 1)]
    resent = publish.messages[-1]
    assert (resent.idx, resent.attempt) == (1, 2)
    assert db.get_item(RUN, 0, 1)["status"] == "queued"


def test_an_item_lost_with_its_worker_max_crashes_times_fails_the_run(fanned):
    from pocoflow.distributed.sweeper import sweep
    from pocoflow.ledger.liveness import record_beat

    db = fanned
    publish = _Published(db)
    t = db.clock()
    db.mark_items_sent([(RUN, 0, i, 1) for i in range(3)])
    record_beat(db, "wa", "h", 1, now=t)
    assert _claim(db, 0, holder="wa#1", now=t)[0]
    sweep(db, publish, lease_s=LEASE, now=t + 5, dead_after_s=3.0, max_crashes=2)
    row = db.get_item(RUN, 0, 0)
    assert (row["status"], row["attempt"], row["crashes"]) == ("queued", 2, 1)
    record_beat(db, "wb", "h", 2, now=t + 5)
    assert _claim(db, 0, holder="wb#1", attempt=2, now=t + 5)[0]
    sweep(db, publish, lease_s=LEASE, now=t + 10, dead_after_s=3.0, max_crashes=2)
    run = db.get_run(RUN)
    assert run["status"] == "failed" and "item 0" in run["error_msg"]
    assert "poison item" in run["error_msg"]
    assert db.get_item(RUN, 0, 0)["status"] == "failed"


def test_items_being_published_by_a_live_worker_are_not_sent_twice(db):
    """A thousand messages take longer to publish than the unsent grace: while the
    publishing process beats, its unsent items are left to it; once it says it is done,
    or dies, the sweeper sends what is still unsent."""
    from pocoflow.ledger.liveness import record_beat

    db.create_run(RUN, "f", initial_store={}, status="running")
    db.insert_step(RUN, 0, "M", lease_s=LEASE)
    db.claim_step(RUN, 0, 1, "wp", LEASE, holder="wp#1")
    record_beat(db, "wp", "h", 1, now=100.0)
    db.fan_out(RUN, 0, 1, "wp#1", "wp", ['"a"', '"b"'], [], now=100.0)
    db.mark_items_sent([(RUN, 0, 0, 1)])
    assert db.unsent_items(1.0, 3.0, now=102.0) == []  # wp is still publishing
    assert [r["idx"] for r in db.unsent_items(1.0, 3.0, now=104.0)] == [1]  # wp died
    assert db.items_published(RUN, 0, "wp") is True
    assert [r["idx"] for r in db.unsent_items(1.0, 3.0, now=102.0)] == [1]


def test_a_live_publisher_that_never_says_done_does_not_hold_its_items_for_ever(db):
    """A worker that committed a fan-out (or a resume's re-open) and then failed before
    publishing (the ledger went away under ``_end``, an exception) keeps beating while
    ``sending_by`` still names it: its unsent items must be sent after the publishing
    window, or the run is stuck for as long as that worker lives."""
    from pocoflow.ledger.itemrecovery import PUBLISH_WINDOW_S
    from pocoflow.ledger.liveness import record_beat

    db.create_run(RUN, "f", initial_store={}, status="running")
    db.insert_step(RUN, 0, "M", lease_s=LEASE)
    db.claim_step(RUN, 0, 1, "wp", LEASE, holder="wp#1")
    db.fan_out(RUN, 0, 1, "wp#1", "wp", ['"a"', '"b"'], [], now=100.0)
    late = 100.0 + PUBLISH_WINDOW_S + 1
    record_beat(db, "wp", "h", 1, now=late)  # wp is alive and well, but never published
    assert [r["idx"] for r in db.unsent_items(1.0, 3.0, now=late)] == [0, 1]
    record_beat(db, "wp", "h", 1, now=102.0)
    assert db.unsent_items(1.0, 3.0, now=102.0) == []  # within the window: left to wp


def test_a_resume_forgets_the_crashes_of_a_poison_item(fanned):
    """A poison item fails its run; the user fixes the node and resumes. Its tries start
    again at 1 and so must its crash count: one ordinary worker loss later must not fail
    the run again at once as a poison item."""
    db = fanned
    c = _c(0)
    assert _claim(db, 0)[0]
    # Lost with its worker once (crashes 1), then failed for good by the poison check.
    assert db.take_over_item(RUN, 0, 0, 1, "w1#1", crashed=True) == 2
    assert _claim(db, 0, holder="w2#1", attempt=2)[0]
    c = _c(0, holder="w2#1", attempt=2)
    assert db.fail_item(
        c, error_json='{"type": "WorkerLost", "message": "x"}', error_msg="poison", events=[]
    )
    assert db.get_item(RUN, 0, 0)["crashes"] == 1
    db.update_run_if(RUN, status_in=("failed",), status="running", error_msg=None)
    db.take_over(RUN, 0, 1, LEASE, force=True)
    assert db.claim_step(RUN, 0, 2, "w0", LEASE, holder="w0#2")
    _state, todo = db.reopen_items(RUN, 0, 2, "w0#2", "w0")
    assert [r["idx"] for r in todo] == [0, 1, 2]
    row = db.get_item(RUN, 0, 0)
    assert (row["status"], row["try_number"], row["crashes"]) == ("queued", 1, 0)


def test_a_retry_a_dead_worker_held_is_sent_again_with_the_rest_of_its_backoff(fanned):
    """A retry waits out its backoff in a worker's memory (a countdown message). If that
    worker dies, the re-send keeps what is left of the backoff, as a step's does, rather
    than running the retry at once."""
    from pocoflow.distributed.sweeper import sweep
    from pocoflow.ledger.liveness import record_beat

    db = fanned
    db.mark_items_sent([(RUN, 0, i, 1) for i in range(3)])
    t = db.clock()
    assert _claim(db, 1)[0]
    assert db.retry_item(_c(1), next_try=2, due_in=30.0) == 2
    db.mark_items_sent([(RUN, 0, 1, 2)])
    record_beat(db, "wdead", "h", 1, [(RUN, 0, 1, 2)], now=t)
    assert db.get_item(RUN, 0, 1)["received_by"] == "wdead"
    sent: list = []

    def publish(message, queue=None, **kwargs) -> bool:
        sent.append((message, kwargs))
        return True

    report = sweep(db, publish, lease_s=LEASE, now=t + 5, dead_after_s=3.0)
    assert report.items == [(RUN, 0, 1)]
    message, kwargs = sent[-1]
    assert (message.idx, message.attempt, message.try_number) == (1, 2, 2)
    assert 20.0 < kwargs.get("countdown", 0.0) <= 25.5


def test_an_items_crashes_are_counted_in_a_row_a_retry_of_its_own_ends_the_row(fanned):
    """Crashes of the executor count toward the budget only in a row: a delivery that ran
    the item to a retry of its own (its exec raised) starts the count again."""
    db = fanned
    assert _claim(db, 0)[0]
    assert db.retry_item(_c(0), next_try=1, due_in=0.0, crashed_on=["w1"]) == 2
    assert db.get_item(RUN, 0, 0)["crashes"] == 1
    assert _claim(db, 0, holder="w2#1", attempt=2)[0]
    assert db.retry_item(_c(0, holder="w2#1", attempt=2), next_try=2, due_in=0.0) == 3
    assert db.get_item(RUN, 0, 0)["crashes"] == 0


def test_a_resume_starts_the_crash_count_of_every_reopened_item_afresh(fanned):
    """An item queued again after a crash when its run paused: the resume (a re-claim of
    the step that re-opens its items) is a new start, for its crashes as for its tries."""
    db = fanned
    assert _claim(db, 0)[0]
    assert db.take_over_item(RUN, 0, 0, 1, "w1#1", crashed=True) == 2
    assert (db.get_item(RUN, 0, 0)["status"], db.get_item(RUN, 0, 0)["crashes"]) == ("queued", 1)
    db.take_over(RUN, 0, 1, LEASE, force=True)
    assert db.claim_step(RUN, 0, 2, "w0", LEASE, holder="w0#2")
    _state, todo = db.reopen_items(RUN, 0, 2, "w0#2", "w0")
    assert [r["idx"] for r in todo] == [0, 1, 2]
    assert db.get_item(RUN, 0, 0)["crashes"] == 0


def test_a_claim_refused_by_a_pause_reports_the_pause(fanned):
    """A pause that lands while an item is being claimed: the claim is refused and its
    answer carries the pause (the worker then parks the run). On PostgreSQL the guard
    read and the claim are two autocommit statements: here the claim's UPDATE waits on
    a lock on pf_items after the guard read, and the pause commits as the lock goes, so
    the first guard read still says 'running' (a refusal taken for a duplicate before).
    On SQLite both are one transaction: the pause simply comes first."""
    import time

    db = fanned
    got: dict[str, object] = {}
    claimer = threading.Thread(target=lambda: got.update(r=_claim(db, 0)))
    if db._ledger.dialect != "postgresql":
        assert db.update_run_if(RUN, status_in=("running",), control="pause")
        claimer.start()
    else:
        import psycopg

        url = db._ledger.engine.url.set(drivername="postgresql")
        dsn = url.render_as_string(hide_password=False)
        with psycopg.connect(dsn) as admin, psycopg.connect(dsn, autocommit=True) as mon:
            admin.execute("LOCK TABLE pf_items IN ACCESS EXCLUSIVE MODE")
            claimer.start()
            deadline = time.monotonic() + 10
            waiting = "SELECT count(*) FROM pg_locks WHERE NOT granted"
            while not mon.execute(waiting).fetchone()[0]:  # type: ignore[index]
                assert time.monotonic() < deadline, "the claim never waited on the lock"
                time.sleep(0.01)
            admin.execute("UPDATE pf_runs SET control = 'pause' WHERE run_id = %s", [RUN])
            admin.commit()  # the pause and the lock's release, at once
    claimer.join(10)
    assert not claimer.is_alive()
    claimed, run, item = got["r"]  # type: ignore[misc]
    assert (claimed, item) == (False, None)
    assert (run["status"], run["control"]) == ("running", "pause")
    assert db.get_item(RUN, 0, 0)["lease_owner"] is None


def test_a_released_item_mark_of_its_own_receiver_goes(fanned):
    """A heartbeat's ``released`` unmarks items as it does steps: only its own marks."""
    from pocoflow.ledger.liveness import record_beat

    db = fanned
    db.mark_items_sent([(RUN, 0, i, 1) for i in range(3)])
    record_beat(db, "wa", "h", 1, [(RUN, 0, 0, 1)])
    record_beat(db, "wb", "h", 2, [(RUN, 0, 1, 1)])
    record_beat(db, "wa", "h", 1, released=[(RUN, 0, 0, 1), (RUN, 0, 1, 1)])
    assert db.get_item(RUN, 0, 0)["received_by"] is None
    assert db.get_item(RUN, 0, 1)["received_by"] == "wb"
