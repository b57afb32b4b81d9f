"""Messages a dead worker took from a Redis broker unrecorded (``distributed.orphans``),
on both ledgers with a real Redis: the broker's ``unacked`` entry of a step the ledger
still has queued is what finds it, one sweeper sends it again under its attempt, and an
entry a live worker holds, or whose attempt is over, is never sent.

A real kombu consumer takes the message without acknowledging it, as a Celery worker
does with its prefetch: the entry it leaves is the one a worker killed with -9 leaves.
Its delivery time is moved back rather than waited for."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from pocoflow.distributed import orphans, sweeper
from pocoflow.distributed.celery_app import TASK_NAME, create_app
from pocoflow.distributed.message import StepMessage
from pocoflow.distributed.publish import Publisher
from pocoflow.ledger import liveness
from pocoflow.settings import Settings
from tests.distributed.conftest import fresh_redis_db
from tests.ledger.test_sweeper import Sent, submitted

pytestmark = pytest.mark.ledger

DEAD_AFTER_S = 3.0
LEASE_S = 30.0


class Broker:
    """A real Redis broker with a consumer that reserves messages and never acks."""

    def __init__(self, url: str, db: Any) -> None:
        import redis

        self.app = create_app(Settings(db_url="sqlite:///unused.db", broker_url=url))
        self.publisher = Publisher(self.app, db)
        self.client = redis.Redis.from_url(url)
        self.connection = self.app.connection_for_read()
        self.received: list[Any] = []
        sweeper.BrokerSentinel(self.client).set()  # a broker that lost nothing

    def publish(self, message: StepMessage, db: Any) -> None:
        assert self.publisher.send(message)
        db.mark_sent(message.run_id, message.step, message.attempt)
        backdate(db, message.run_id)

    def reserve(self, *, age_s: float = 10.0) -> bytes:
        """Take one message as a worker's prefetch does (no ack), delivered ``age_s`` ago."""
        from kombu import Consumer, Queue

        with Consumer(
            self.connection.default_channel,
            [Queue("pocoflow")],
            callbacks=[lambda body, message: self.received.append(message)],
            accept=["json"],
        ):
            self.connection.drain_events(timeout=10)
        (tag,) = self.client.zrange(orphans.UNACKED_INDEX, 0, -1)
        self.client.zadd(orphans.UNACKED_INDEX, {tag: time.time() - age_s})
        return tag

    def unacked(self) -> int:
        return int(self.client.hlen(orphans.UNACKED))

    def close(self) -> None:
        self.client.delete(orphans.UNACKED, orphans.UNACKED_INDEX)  # no restore on close
        self.connection.release()
        self.app.close()


@pytest.fixture
def broker(redis_url: str, db: Any) -> Iterator[Broker]:
    broker = Broker(fresh_redis_db(redis_url), db)
    yield broker
    broker.close()


class Clock:
    """The sweeper's own clock (how long it has seen an entry), moved by hand."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def sentinel_of(broker: Broker) -> tuple[sweeper.BrokerSentinel, Clock]:
    clock = Clock()
    return sweeper.BrokerSentinel(broker.client, clock=clock), clock


def swept(db: Any, broker: Broker, sent: Any, **kw: Any) -> sweeper.SweepReport:
    """Two sweeps of one sweeper, ``DEAD_AFTER_S`` apart on its own clock: the first sees
    the entries, the second may act on them (the second's report)."""
    sentinel, clock = kw.pop("sentinel", None) or sentinel_of(broker)
    first = sweeper.sweep(
        db, sent, lease_s=LEASE_S, dead_after_s=DEAD_AFTER_S, sentinel=sentinel, **kw
    )
    assert (not first.resent and not first.items) or kw.get("now"), first
    clock.t += DEAD_AFTER_S
    return sweeper.sweep(
        db, sent, lease_s=LEASE_S, dead_after_s=DEAD_AFTER_S, sentinel=sentinel, **kw
    )


def backdate(db: Any, run_id: str, seconds: float = 10.0) -> None:
    """Queued and sent ``seconds`` earlier than now: what an orphan's row looks like (its
    entry was delivered, and its worker died, seconds ago)."""
    from sqlalchemy import update

    from pocoflow.ledger.tables import pf_items, pf_steps

    with db._ledger.engine.begin() as conn:
        for table in (pf_steps, pf_items):
            conn.execute(
                update(table)
                .where(table.c.run_id == run_id)
                .values(queued_at=table.c.queued_at - seconds, sent_at=table.c.sent_at - seconds)
            )


def sent_step(db: Any) -> StepMessage:
    first, _ = submitted(db)
    db.mark_sent(first.run_id, 0, 1)
    backdate(db, first.run_id)
    return first


def entry(broker: Broker, tag: str, message: Any, *, age_s: float = 10.0, task: str = "") -> None:
    """An unacked entry as kombu writes it (``QoS.append``), delivered ``age_s`` ago."""
    body = base64.b64encode(json.dumps([[message.to_dict()], {}, {}]).encode()).decode()
    headers = {"task": task or TASK_NAME}
    raw = {"body": body, "headers": headers, "properties": {"body_encoding": "base64"}}
    broker.client.hset(orphans.UNACKED, tag, json.dumps([raw, "", "pocoflow"]))
    broker.client.zadd(orphans.UNACKED_INDEX, {tag: time.time() - age_s})


def test_a_message_a_dead_worker_took_unrecorded_is_sent_again_once(
    db: Any, broker: Broker
) -> None:
    first, _ = submitted(db)
    broker.publish(first, db)
    broker.reserve(age_s=DEAD_AFTER_S / 2)  # received lately: its worker may record it yet
    sent = Sent(db)
    assert not swept(db, broker, sent) and broker.unacked() == 1
    (tag,) = broker.client.zrange(orphans.UNACKED_INDEX, 0, -1)
    broker.client.zadd(orphans.UNACKED_INDEX, {tag: time.time() - 10})
    # Delivered long ago by its host's clock, which may run behind: a sweeper that has
    # only just seen it waits until it has seen it for half of dead_after.
    sentinel, clock = sentinel_of(broker)

    def one_sweep() -> sweeper.SweepReport:
        return sweeper.sweep(
            db, sent, lease_s=LEASE_S, dead_after_s=DEAD_AFTER_S, sentinel=sentinel
        )

    assert not one_sweep()
    clock.t += DEAD_AFTER_S / 2 - 0.1
    assert not one_sweep()
    clock.t += 0.1
    report = one_sweep()
    assert report.resent == [(first.run_id, 0)]
    assert [m for m, _ in sent.messages] == [first]  # the same attempt: its claim decides
    assert broker.unacked() == 0  # no sweeper sends it twice, no restore in an hour
    row = db.get_step(first.run_id, 0)
    assert row["status"] == "queued" and row["sent_at"] is not None  # marked sent anew
    assert row["lease_expires_at"] > db.clock() + LEASE_S / 2
    assert not swept(db, broker, sent)


def test_two_sweepers_racing_send_an_orphan_once(db: Any, broker: Broker) -> None:
    lost = sent_step(db)
    entry(broker, "dead", lost)
    sent = Sent(db)
    (one, one_clock), (two, two_clock) = sentinel_of(broker), sentinel_of(broker)
    one.orphans(DEAD_AFTER_S), two.orphans(DEAD_AFTER_S)  # both see it
    one_clock.t += DEAD_AFTER_S
    two_clock.t += DEAD_AFTER_S
    stale = two.orphans(DEAD_AFTER_S)  # two has it in hand ...
    assert [o.tag for o in stale] == [b"dead"]
    report = sweeper.sweep(db, sent, lease_s=LEASE_S, dead_after_s=DEAD_AFTER_S, sentinel=one)
    assert report.resent == [(lost.run_id, 0)]  # ... while one sends it
    two.orphans = lambda older_than_s: stale  # type: ignore[method-assign]
    again = sweeper.sweep(db, sent, lease_s=LEASE_S, dead_after_s=DEAD_AFTER_S, sentinel=two)
    assert not again.resent and len(sent.messages) == 1  # the entry's one owner sends it
    assert db.get_step(lost.run_id, 0)["sent_at"] is not None  # and it stays marked sent


def test_a_failed_publish_leaves_an_outbox_row_the_unsent_pass_sends(
    db: Any, broker: Broker
) -> None:
    lost = sent_step(db)
    entry(broker, "dead", lost)

    def failing(message: Any, **_: Any) -> bool:
        return False

    assert not swept(db, broker, failing).resent
    assert broker.unacked() == 0 and db.get_step(lost.run_id, 0)["sent_at"] is None
    sent = Sent(db)
    report = sweeper.sweep(db, sent, lease_s=LEASE_S, now=db.clock() + 2)  # after the grace
    assert report.resent == [(lost.run_id, 0)] and [m for m, _ in sent.messages] == [lost]


def test_a_message_a_live_worker_recorded_is_left_to_it(db: Any, broker: Broker) -> None:
    first, _ = submitted(db)
    broker.publish(first, db)
    broker.reserve()
    liveness.record_beat(db, "host:7", "host", 7, [(first.run_id, 0, 1)])  # alive, holds it
    sent = Sent(db)
    sentinel, clock = sentinel_of(broker)
    assert not swept(db, broker, sent, sentinel=(sentinel, clock))
    assert sent.messages == [] and broker.unacked() == 1  # still the live worker's
    assert sentinel.orphans(DEAD_AFTER_S) == []  # not read again for a while
    clock.t += sweeper.BrokerSentinel.HELD_MEMO_S
    assert [o.message for o in sentinel.orphans(DEAD_AFTER_S)] == [first]  # then looked at


def test_a_dead_receivers_message_is_sent_once(db: Any, broker: Broker) -> None:
    """The heartbeat recorded it, then its worker died: the dead-receiver pass sends it,
    and the orphan pass only removes the old copy's entry."""
    lost = sent_step(db)
    liveness.record_beat(db, "host:7", "host", 7, [(lost.run_id, 0, 1)], now=db.clock() - 10)
    entry(broker, "dead", lost)
    sent = Sent(db)
    sentinel, clock = sentinel_of(broker)
    sentinel.orphans(DEAD_AFTER_S)
    clock.t += DEAD_AFTER_S
    report = sweeper.sweep(db, sent, lease_s=LEASE_S, dead_after_s=DEAD_AFTER_S, sentinel=sentinel)
    assert report.resent == [(lost.run_id, 0)]
    assert [m for m, _ in sent.messages] == [lost] and broker.unacked() == 0


def test_live_and_foreign_entries_do_not_hide_an_orphan(db: Any, broker: Broker) -> None:
    """A page's worth of older entries held by a live worker, and of another app's tasks on
    the same broker database, are passed over before their payloads are read."""
    held = [sent_step(db) for _ in range(orphans.PAGE)]
    liveness.record_beat(db, "host:7", "host", 7, [(m.run_id, 0, 1) for m in held])
    for i, message in enumerate(held):
        entry(broker, f"live-{i}", message, age_s=100 - i * 0.01)
        entry(broker, f"x-{i}", message, age_s=200, task="billing.reminder")
    lost = sent_step(db)
    entry(broker, "dead", lost)
    sent = Sent(db)
    sentinel, clock = sentinel_of(broker)
    # A page of payloads per sweep: theirs are judged once, then passed over unread.
    reports = [swept(db, broker, sent, sentinel=(sentinel, clock)) for _ in range(3)]
    assert [r.resent for r in reports] == [[], [(lost.run_id, 0)], []]
    assert broker.unacked() == 2 * orphans.PAGE  # theirs stay


def test_a_step_number_past_the_ledgers_integers_is_no_step_message(broker: Broker) -> None:
    message = StepMessage("r1", "f", 0, "n", 1)
    bad = {**message.to_dict(), "step": 2**64}
    body = base64.b64encode(json.dumps([[bad], {}, {}]).encode()).decode()
    raw = {"body": body, "headers": {"task": TASK_NAME}, "properties": {"body_encoding": "base64"}}
    broker.client.hset(orphans.UNACKED, "bad", json.dumps([raw, "", "pocoflow"]))
    assert orphans.decode(broker.client, [b"bad"]) == {b"bad": None}


def test_an_entry_that_cannot_be_judged_does_not_stop_the_sweep(
    db: Any, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lookup that fails for one entry (not because the ledger is away) passes it over
    for a while; the other orphans are sent, and the rest of the sweep runs. A ledger
    that is away ends the sweep, as in every other pass."""
    from sqlalchemy.exc import OperationalError

    bad, lost = sent_step(db), sent_step(db)
    entry(broker, "bad", bad, age_s=20)
    entry(broker, "dead", lost)
    get_step = db.get_step
    failure: list[Exception] = [ValueError("a value no column takes")]

    def failing(run_id: str, step: int) -> Any:
        if run_id == bad.run_id and failure:
            raise failure[0]
        return get_step(run_id, step)

    monkeypatch.setattr(db, "get_step", failing)
    sent = Sent(db)
    sentinel, clock = sentinel_of(broker)
    report = swept(db, broker, sent, sentinel=(sentinel, clock))
    assert report.resent == [(lost.run_id, 0)] and broker.unacked() == 1
    assert sentinel.orphans(DEAD_AFTER_S) == []  # the bad one is passed over for a while
    failure[0] = OperationalError("SELECT", {}, Exception("server closed the connection"))
    clock.t += sweeper.BrokerSentinel.HELD_MEMO_S
    with pytest.raises(OperationalError):
        sweeper.sweep(db, sent, lease_s=LEASE_S, dead_after_s=DEAD_AFTER_S, sentinel=sentinel)


def test_a_dead_receivers_message_another_sweeper_sent_is_not_sent_again(
    db: Any, broker: Broker
) -> None:
    """Sweeper one sends a dead receiver's message again; sweeper two, which watched the
    dead worker's entry all along, finds a step handed out just now: its entry is an old
    copy, sent by nobody again."""
    lost = sent_step(db)
    liveness.record_beat(db, "host:7", "host", 7, [(lost.run_id, 0, 1)], now=db.clock() - 10)
    entry(broker, "dead", lost)
    sent = Sent(db)
    two, two_clock = sentinel_of(broker)
    two.orphans(DEAD_AFTER_S)
    two_clock.t += DEAD_AFTER_S
    assert sweeper.sweep(db, sent, lease_s=LEASE_S, dead_after_s=DEAD_AFTER_S).resent == [
        (lost.run_id, 0)
    ]  # one, without a broker view: the dead-receiver pass
    again = sweeper.sweep(db, sent, lease_s=LEASE_S, dead_after_s=DEAD_AFTER_S, sentinel=two)
    assert not again.resent and len(sent.messages) == 1


def test_a_claimed_step_keeps_its_late_ack_entry(db: Any, broker: Broker) -> None:
    """A worker with late acks runs the step while its message stays unacked: the claim
    says it is taken, so its entry is neither sent nor removed."""
    first, _ = submitted(db)
    broker.publish(first, db)
    broker.reserve()
    assert db.claim_step(first.run_id, 0, 1, "host:8", LEASE_S)
    sent = Sent(db)
    assert not swept(db, broker, sent)
    assert sent.messages == [] and broker.unacked() == 1


def test_an_orphan_whose_attempt_moved_on_is_only_removed(db: Any, broker: Broker) -> None:
    first, _ = submitted(db)
    broker.publish(first, db)
    broker.reserve()
    later = db.clock() + 2 * LEASE_S  # its lease ran out: the sweeper took it over
    assert db.take_over(first.run_id, 0, 1, LEASE_S, now=later) == 2
    sent = Sent(db)
    assert not swept(db, broker, sent)
    assert sent.messages == [] and broker.unacked() == 0


def test_an_orphan_of_a_paused_run_is_not_sent(db: Any, broker: Broker) -> None:
    first, _ = submitted(db)
    broker.publish(first, db)
    broker.reserve()
    db.update_run_if(first.run_id, status_in=("queued",), status="paused")
    sent = Sent(db)
    assert not swept(db, broker, sent)
    assert sent.messages == [] and broker.unacked() == 1  # a resume sends the step


def test_other_tasks_and_unreadable_entries_are_passed_over(broker: Broker) -> None:
    broker.client.zadd(orphans.UNACKED_INDEX, {b"a": 1.0, b"b": 2.0, b"c": 3.0})
    other = {"headers": {"task": "someone.else"}, "body": "W10=", "properties": {}}
    broker.client.hset(orphans.UNACKED, mapping={"a": "not json", "b": f"[{json.dumps(other)}]"})
    assert orphans.decode(broker.client, [b"a", b"b", b"c"]) == {b"a": None, b"b": None, b"c": None}


def test_an_item_message_a_dead_worker_took_unrecorded_is_sent_again(
    db: Any, broker: Broker
) -> None:
    from pocoflow.distributed.message import ItemMessage

    db.create_run("r1", "f", initial_store={}, status="running")
    db.insert_step("r1", 0, "M", lease_s=LEASE_S)
    assert db.claim_step("r1", 0, 1, "w0", LEASE_S, holder="w0#1")
    assert db.fan_out("r1", 0, 1, "w0#1", "w0", ['"a"', '"b"'], [])
    item = ItemMessage("r1", "f", 0, "M", 1, 1)
    assert broker.publisher.send(item)
    db.mark_items_sent([item.key, ("r1", 0, 0, 1)])  # item 0's copy went elsewhere
    backdate(db, "r1")
    broker.reserve()
    sent = Sent(db)
    report = swept(db, broker, sent)
    assert report.items == [("r1", 0, 1)]
    assert [m for m, _ in sent.messages] == [item]
    assert broker.unacked() == 0
    assert not swept(db, broker, sent).items  # once
