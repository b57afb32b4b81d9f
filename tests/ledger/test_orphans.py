"""Messages a dead worker took from a Redis broker unrecorded (``distributed.orphans``),
on both ledgers with a real Redis: the broker's ``unacked`` entry of a step the ledger
still has queued is what finds it, one sweeper sends it again under its attempt, and an
entry a live worker holds, or whose attempt is over, is never sent.

A real kombu consumer takes the message without acknowledging it, as a Celery worker
does with its prefetch: the entry it leaves is the one a worker killed with -9 leaves.
Its delivery time is moved back rather than waited for."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from pocoflow.distributed import orphans, sweeper
from pocoflow.distributed.celery_app import create_app
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


def swept(db: Any, broker: Broker, sent: Sent, **kw: Any) -> sweeper.SweepReport:
    sentinel = kw.pop("sentinel", None) or sweeper.BrokerSentinel(broker.client)
    return sweeper.sweep(
        db, sent, lease_s=LEASE_S, dead_after_s=DEAD_AFTER_S, sentinel=sentinel, **kw
    )


def test_a_message_a_dead_worker_took_unrecorded_is_sent_again_once(
    db: Any, broker: Broker
) -> None:
    first, _ = submitted(db)
    broker.publish(first, db)
    broker.reserve(age_s=DEAD_AFTER_S / 2)  # received lately: its worker may record it yet
    sent = Sent(db)
    assert not swept(db, broker, sent) and broker.unacked() == 1
    broker.client.zadd(
        orphans.UNACKED_INDEX,
        {broker.client.zrange(orphans.UNACKED_INDEX, 0, -1)[0]: time.time() - 10},
    )
    report = swept(db, broker, sent)
    assert report.resent == [(first.run_id, 0)]
    assert [m for m, _ in sent.messages] == [first]  # the same attempt: its claim decides
    assert broker.unacked() == 0  # taken: no sweeper sends it twice, no restore in an hour
    row = db.get_step(first.run_id, 0)
    assert row["status"] == "queued" and row["lease_expires_at"] > db.clock() + LEASE_S / 2
    assert not swept(db, broker, sent)


def test_two_sweepers_send_an_orphan_once(db: Any, broker: Broker) -> None:
    first, _ = submitted(db)
    broker.publish(first, db)
    tag = broker.reserve()
    sent = Sent(db)
    one, two = sweeper.BrokerSentinel(broker.client), sweeper.BrokerSentinel(broker.client)
    found = one.orphans(DEAD_AFTER_S)
    assert [o.tag for o in found] == [tag] == [o.tag for o in two.orphans(DEAD_AFTER_S)]
    assert one.take(tag) and not two.take(tag)
    assert not swept(db, broker, sent, sentinel=two)  # the entry is gone: nothing to send


def test_a_message_a_live_worker_recorded_is_left_to_it(db: Any, broker: Broker) -> None:
    first, _ = submitted(db)
    broker.publish(first, db)
    broker.reserve()
    liveness.record_beat(db, "host:7", "host", 7, [(first.run_id, 0, 1)])  # alive, holds it
    sent = Sent(db)
    sentinel = sweeper.BrokerSentinel(broker.client)
    assert not swept(db, broker, sent, sentinel=sentinel)
    assert sent.messages == [] and broker.unacked() == 1  # still the live worker's
    assert sentinel.orphans(DEAD_AFTER_S) == []  # not read again for a while


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
    broker.client.hset(orphans.UNACKED, mapping={"a": "not json", "b": f"[{_json(other)}]"})
    assert orphans.unacked(broker.client, 0.0) == []


def _json(value: Any) -> str:
    import json

    return json.dumps(value)


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
    db.mark_items_sent([item.key])
    broker.reserve()
    sent = Sent(db)
    report = swept(db, broker, sent)
    assert report.items == [("r1", 0, 1)]
    assert [m for m, _ in sent.messages] == [item]
    assert broker.unacked() == 0
    assert not swept(db, broker, sent).items  # once
