"""Redis control flags (key templates, TTL, a Redis that is down) and the cancel probe a
long exec polls (G4). fakeredis stands in for Redis; the distributed suite uses a real one."""

from __future__ import annotations

from typing import Any

import fakeredis
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from pocoflow.distributed.control import (
    CANCEL,
    FLAG_TTL_S,
    PAUSE,
    FlagReader,
    clear_flag,
    flag_key,
    read_flags,
    set_flag,
    with_retry,
)

pytestmark = pytest.mark.unit


@pytest.fixture
def client() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


class DownRedis:
    """Every call fails as a Redis that is not there."""

    calls = 0

    def __getattr__(self, name: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> Any:
            DownRedis.calls += 1
            raise RedisConnectionError("Connection refused")

        return fail


class FakeLedger:
    def __init__(self, **run: Any) -> None:
        self.run = {"status": "running", "control": None, **run}
        self.reads = 0

    def get_run(self, run_id: str) -> dict[str, Any]:
        self.reads += 1
        return self.run


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_key_template() -> None:
    assert flag_key("run-1", CANCEL) == "pocoflow:run-1:cancel"
    assert flag_key("run-1", PAUSE) == "pocoflow:run-1:pause"
    with pytest.raises(ValueError, match="Unknown control flag 'stop'"):
        flag_key("run-1", "stop")


def test_set_read_clear(client: fakeredis.FakeRedis) -> None:
    assert read_flags(client, "r") == frozenset()
    assert set_flag(client, "r", PAUSE)
    assert set_flag(client, "r", CANCEL)
    assert read_flags(client, "r") == {CANCEL, PAUSE}
    assert read_flags(client, "other") == frozenset()
    assert clear_flag(client, "r", PAUSE)
    assert read_flags(client, "r") == {CANCEL}


def test_flags_expire(client: fakeredis.FakeRedis) -> None:
    set_flag(client, "r", CANCEL)
    assert 0 < client.ttl(flag_key("r", CANCEL)) <= FLAG_TTL_S


def test_a_down_redis_is_retried_for_a_bounded_time_then_reported() -> None:
    clock = Clock()
    DownRedis.calls = 0
    assert not set_flag(DownRedis(), "r", CANCEL, budget_s=0)  # type: ignore[arg-type]
    assert read_flags(DownRedis(), "r") is None  # type: ignore[arg-type]
    result = with_retry(
        lambda: DownRedis().get("k"), budget_s=2.0, what="t", sleep=clock.sleep, clock=clock
    )
    assert result is None
    assert 100.0 < clock.now <= 102.0  # backed off within the budget, never past it


def test_with_retry_returns_once_redis_answers() -> None:
    clock = Clock()
    answers = iter([RedisConnectionError("down"), RedisConnectionError("down"), "ok"])

    def call() -> str:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert with_retry(call, budget_s=5, what="t", sleep=clock.sleep, clock=clock) == "ok"


def test_the_probe_reads_redis_at_most_every_interval(client: fakeredis.FakeRedis) -> None:
    clock = Clock()
    ledger = FakeLedger()
    probe = FlagReader("r", client, ledger, interval_s=0.5, clock=clock)  # type: ignore[arg-type]
    assert probe() is False
    set_flag(client, "r", CANCEL)
    ledger.run.update(status="cancelled", control=CANCEL)
    clock.now += 0.2
    assert probe() is False  # cached: Redis not asked again yet
    clock.now += 0.4
    assert probe() is True
    assert probe() is True  # cancel is final


def test_a_stale_redis_cancel_is_overruled_by_the_ledger(client: fakeredis.FakeRedis) -> None:
    set_flag(client, "r", CANCEL)  # left over: the run was resumed while Redis was down
    probe = FlagReader("r", client, FakeLedger(), interval_s=0)  # type: ignore[arg-type]
    assert probe() is False


def test_without_redis_the_probe_asks_the_ledger() -> None:
    ledger = FakeLedger()
    probe = FlagReader("r", DownRedis(), ledger, interval_s=0)  # type: ignore[arg-type]
    assert probe() is False
    ledger.run["control"] = CANCEL
    assert probe() is True
    assert ledger.reads == 2


def test_a_cancel_whose_flag_never_reached_redis_still_reaches_the_exec(
    client: fakeredis.FakeRedis,
) -> None:
    """Redis answers "no flag" (restarted empty, or set_flag gave up) while the ledger says
    cancelled: the probe confirms with the ledger every ``ledger_interval_s`` anyway."""
    clock = Clock()
    ledger = FakeLedger()
    probe = FlagReader("r", client, ledger, interval_s=0.5, clock=clock)  # type: ignore[arg-type]
    assert probe() is False
    reads_at_start = ledger.reads
    ledger.run.update(status="cancelled", control=CANCEL)  # no Redis flag
    for _ in range(5):  # 2.5 s of polls: Redis only, the ledger is not asked
        clock.now += 0.5
        assert probe() is False
    assert ledger.reads == reads_at_start
    clock.now += probe.ledger_interval_s
    assert probe() is True
    assert ledger.reads == reads_at_start + 1
