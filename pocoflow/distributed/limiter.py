"""The limiter every worker shares: node limits kept in Redis, one Lua script per decision.

Each decision is ONE ``EVALSHA`` round trip that reads the Redis server's clock
(``TIME``, never a worker's), prunes, checks all three limits and, when the call may
start, records it, so two workers can never both take the last place. Keys, all under
one hash tag per limit key (``{key}``) so a Redis Cluster keeps them on one node (the
run's record of its waits, last, is another slot's: the script never touches it):

- ``pocoflow:limit:{key}:rate:<window ms>``: ZSET of start times (us), an exact sliding
  log: a start is allowed while fewer than N starts lie in the last window; a refused
  waiter is told when its own turn's place frees (turn k: when start k mod N of the
  window leaves it, k div N windows on), so each waiting step asks about once.
- ``pocoflow:limit:{key}:slots``: ZSET holder -> lease expiry (us). Expired entries are
  pruned by the same script, so the slot of a worker killed with -9 is free once its
  lease (``POCOFLOW_LEASE_SECONDS``) runs out; a live holder renews it every lease/3
  from one thread per process, and releases it when the call ends. A renewal puts back
  a holder Redis forgot while its lease ran (a restart without persistence, a flush):
  its call still runs, so it counts again, free place or not; one whose lease may have
  ended, so that its place may be another caller's now, comes back only into a free
  place (the set never grows past the limit through it), else its slot is lost.
- ``pocoflow:limit:{key}:tokens:<window ms>``: ZSET ``<id>:<tokens>`` -> time (us); the
  script sums the window (one entry per recorded call).
- ``pocoflow:limit:{key}:waiters``: ZSET waiter -> when it is forgotten (a second after
  its turn); its rank is the waiter's turn. Nobody knows when a concurrency slot
  frees, so a refused caller asks again later; with W waiters (a step, or a map item,
  is one, whatever its attempt) for N slots each is told to ask again in ``poll * W / N``
  (the first N sooner when a slot's lease ends sooner), so 1,000 steps waiting for 3
  slots cost about 3 asks (a ledger write and a message each) per poll, not 1,000.
  There is no cap on that wait: a cap C would cost W / C asks per poll. A newcomer that
  finds a slot free starts at once.
- ``pocoflow:limit:run:<run id>``: SET of ``[limit key, waiter]`` (JSON): the queues
  the run's steps and items joined, written by a second round trip on a waiter's first
  refusal only (a call allowed at once writes nothing). When the run stops (cancelled,
  paused, failed) ``forget_waiters`` takes its waiters out of those queues, so a
  newcomer queues only behind live waiters, not behind a stopped fan-out's items (200
  of them for 1 slot held one back some 40 s). The client does so as it raises a cancel
  or pause flag (``RemoteControl``); on workers, every delivery that stops its run (a
  failed step or item, a budget pause, a guard that parks) or meets it stopped, and the
  commit that completes it (nothing waits then: the record goes). So a stop recorded
  without Redis (a CLI with only the ledger) is cleared by the first of the run's
  waiting messages to come back, at its turn (about a poll for a slot): every waiter
  has one scheduled, so no sweep is needed. A waiter the purge misses (Redis did not
  answer; it asked just as its run stopped) is forgotten after its turn, as before.

While Redis cannot be reached the limits fail closed: a decision answers "wait" with a
backoff (0.5 s doubling to 15 s) and a warning, so a limited node never runs unlimited;
workers send the step again for then, as for any limit wait.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pocoflow.limits import CONCURRENCY_POLL_S, Decision, Limits, Rate, Slot, new_holder
from pocoflow.logging import get_logger

if TYPE_CHECKING:
    import redis

_log = get_logger("distributed.limiter")

KEY_PREFIX = "pocoflow:limit:"
#: First wait after Redis failed to answer a decision, doubled per failure up to the cap.
OUTAGE_WAIT_S = 0.5
OUTAGE_WAIT_CAP_S = 15.0

# KEYS: rate, slots, tokens, waiters. ARGV: rate count, rate window us, max concurrency,
# token limit, token window us, holder, slot lease us, concurrency poll us, rate entry id,
# waiter id ("" = none). A 0 turns a limit off. Returns {0, 0} (go) or {the wait in us,
# 1 when the waiter was not queued before (its first refusal) else 0}.
ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local waiter = ARGV[10]
local poll = tonumber(ARGV[8])
local wait = 0
-- The key's waiters, this one counted, and this one's turn among them (0 = next): its
-- rank by when the waiters' turns end, so a waiter asking again keeps its place, and a
-- new one queues behind the others.
local waiting, turn = nil, nil
local function queue()
  if waiting == nil then
    redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
    waiting = redis.call('ZCARD', KEYS[4])
    turn = redis.call('ZRANK', KEYS[4], waiter)
    if not turn then
      turn = waiting
      waiting = waiting + 1
    end
  end
  return waiting, turn
end
local cmax = tonumber(ARGV[3])
if cmax > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if not redis.call('ZSCORE', KEYS[2], ARGV[6]) and redis.call('ZCARD', KEYS[2]) >= cmax then
    local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    -- The first round asks again after a poll, or sooner when a slot's lease ends sooner
    -- (its holder may have died). W waiters for cmax slots then take turns, round k a
    -- poll after round k-1, so the asks stay near cmax per poll however many wait. (Not
    -- capped by the lease: live holders renew theirs, so its end says nothing of when a
    -- slot frees, and would call every waiter back at once.)
    wait = math.min(tonumber(first[2]) - now, poll)
    if waiter ~= '' then
      local w = queue()
      wait = wait + poll * (math.max(1, math.ceil(w / cmax)) - 1)
    end
  end
end
local rn = tonumber(ARGV[1])
local rwin = tonumber(ARGV[2])
if rn > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - rwin)
  local n = redis.call('ZCARD', KEYS[1])
  if n >= rn then
    -- The place of turn k frees when start n-rn+(k mod rn) leaves the window, k div rn
    -- windows on: each waiter comes back once, when its own place frees, instead of all
    -- of them at the next edge (W waiters for N places would ask W^2/2N times).
    local k = 0
    if waiter ~= '' then
      local _, r = queue()
      k = r
    end
    local edge = redis.call('ZRANGE', KEYS[1], n - rn + k % rn, n - rn + k % rn, 'WITHSCORES')
    wait = math.max(wait, tonumber(edge[2]) + rwin * (1 + math.floor(k / rn)) - now)
  end
end
local tl = tonumber(ARGV[4])
if tl > 0 then
  local twin = tonumber(ARGV[5])
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - twin)
  local entries = redis.call('ZRANGE', KEYS[3], 0, -1, 'WITHSCORES')
  local total = 0
  for i = 1, #entries, 2 do
    total = total + tonumber(string.match(entries[i], ':(%d+)$'))
  end
  if total >= tl then
    for i = 1, #entries, 2 do
      total = total - tonumber(string.match(entries[i], ':(%d+)$'))
      if total < tl then
        wait = math.max(wait, tonumber(entries[i + 1]) + twin - now)
        break
      end
    end
  end
end
if wait > 0 then
  if waiter ~= '' then
    -- A waiter is forgotten a while after its turn (at least 1 s: a busy worker may
    -- start its message late, and it should keep its turn); the set lives as long as
    -- its last waiter.
    local slack = math.max(poll, 1000000)
    local ttl = math.ceil((wait + slack) / 1000) + 1000
    local new = redis.call('ZADD', KEYS[4], now + wait + slack, waiter)
    if redis.call('PTTL', KEYS[4]) < ttl then
      redis.call('PEXPIRE', KEYS[4], ttl)
    end
    return {math.max(1, math.ceil(wait)), new}
  end
  return {math.max(1, math.ceil(wait)), 0}
end
if waiter ~= '' then
  redis.call('ZREM', KEYS[4], waiter)
end
if rn > 0 then
  redis.call('ZADD', KEYS[1], now, ARGV[9])
  redis.call('PEXPIRE', KEYS[1], math.ceil(rwin / 1000) + 1000)
end
if cmax > 0 then
  local lease = tonumber(ARGV[7])
  redis.call('ZADD', KEYS[2], now + lease, ARGV[6])
  redis.call('PEXPIRE', KEYS[2], math.ceil(lease / 1000) + 1000)
end
return {0, 0}
"""

# KEYS: slots. ARGV: holder, lease us, max concurrency, "1" when the holder's lease
# surely still runs (by its own count) else "0". Returns 1: renewed; 2: the holder was
# missing and holds its slot again; 0: lost (missing, and no free place to come back to).
RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local lease = tonumber(ARGV[2])
local renewed = 1
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  -- Missing while its lease ran: Redis forgot it (a restart without persistence, a
  -- flush), not a prune (ACQUIRE prunes ended leases only). Its call runs on, so it is
  -- counted again, free place or not. A lease that may have ended may have been pruned
  -- and its place given to another call: then it comes back only into a free place.
  if ARGV[4] ~= '1' then
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
    if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
      return 0
    end
  end
  renewed = 2
end
redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.ceil(lease / 1000) + 1000)
return renewed
"""

# KEYS: a run's waits. ARGV: member (limit key and waiter), ttl ms. Its own script, not
# ACQUIRE's: the run's key lies in another hash slot than the limit key's.
REMEMBER_WAIT = """
redis.call('SADD', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
"""

# KEYS: tokens. ARGV: entry "<id>:<tokens>", window us.
RECORD_TOKENS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) / 1000) + 1000)
return 1
"""


#: How long a run's record of its waits outlives the longest wait it was told: the run's
#: stop or completion deletes it, so this only bounds what a run that never ends leaves
#: behind. A waiter still queued when its record expired is not removed at the stop; it
#: is forgotten after its turn, as every waiter was before the record existed.
RUN_WAITS_TTL_S = 7 * 24 * 3600

#: A lease counts as surely running (RENEW may put its holder back, free place or not)
#: until this fraction of it before its end on this process's clock: the margin covers
#: the renewal's way to Redis.
LEASE_MARGIN = 0.1


@dataclass
class _Held:
    """A slot this process holds: ``concurrency`` is its key's limit; on the monotonic
    clock, its lease runs at least until ``lease_ends`` (when the decision or renewal
    that set it was sent, plus the lease)."""

    slot: Slot
    concurrency: int
    lease_ends: float


def _us(seconds: float) -> int:
    return max(1, round(seconds * 1_000_000))


def rate_key(key: str, window: Rate) -> str:
    return f"{KEY_PREFIX}{{{key}}}:rate:{window.window_ms}"


def slots_key(key: str) -> str:
    return f"{KEY_PREFIX}{{{key}}}:slots"


def waiters_key(key: str) -> str:
    return f"{KEY_PREFIX}{{{key}}}:waiters"


def tokens_key(key: str, window: Rate) -> str:
    return f"{KEY_PREFIX}{{{key}}}:tokens:{window.window_ms}"


def run_waits_key(run_id: str) -> str:
    """A SET of ``[limit key, waiter]`` (JSON) the run's steps and items queued under."""
    return f"{KEY_PREFIX}run:{run_id}"


def forget_waiters(client: redis.Redis, run_id: str) -> int:
    """Take the run's waiters out of every limit key's queue they joined: a run that
    stopped (cancelled, paused, failed) asks no more, and a newcomer must not be told to
    come back after them. Returns how many were still queued. Never raises: a Redis that
    does not answer leaves them to be forgotten after their turns, as before; the stop
    itself must not fail for it.

    Only the members read are removed from the run's record: a waiter that joined while
    this ran (a call of the run asking as it stopped) stays recorded for the next stop
    that is seen (its own delivery's, when it comes back to a stopped run)."""
    record = run_waits_key(run_id)
    try:
        members = client.smembers(record)
        if not members:
            return 0
        by_key: dict[str, list[str]] = {}
        for member in members:
            key, waiter = json.loads(member)
            by_key.setdefault(key, []).append(waiter)
        pipe = client.pipeline(transaction=False)  # a key per slot: no MULTI across them
        for key, waiters in by_key.items():
            pipe.zrem(waiters_key(key), *waiters)
        pipe.srem(record, *members)
        removed = sum(pipe.execute()[:-1])
    except Exception as exc:
        _log.warning(
            "Could not take the limit waiters of run %s out of their queues (%s); they are "
            "forgotten after their turns",
            run_id,
            exc,
        )
        return 0
    if removed:
        _log.info("Run %s: %d limit waiter(s) taken out of their queues", run_id, removed)
    return removed


class RedisLimiter:
    """``pocoflow.limits.Limiter`` on Redis, shared by every worker and process."""

    def __init__(
        self, client: redis.Redis, *, lease_s: float, poll_s: float = CONCURRENCY_POLL_S
    ) -> None:
        self.client = client
        self.lease_s = lease_s
        self.poll_s = poll_s
        self._acquire = client.register_script(ACQUIRE)
        self._renew = client.register_script(RENEW)
        self._record = client.register_script(RECORD_TOKENS)
        self._remember = client.register_script(REMEMBER_WAIT)
        self._failures = 0
        self._held: dict[str, _Held] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0
        #: Confirms a CANCEL flag against the ledger (workers set it): a flag left over
        #: after a resume that could not reach Redis must not evict a live run's waiter.
        self.run_cancelled: Callable[[str], bool] | None = None

    @classmethod
    def from_url(cls, url: str, *, lease_s: float) -> RedisLimiter:
        from pocoflow.distributed.control import redis_client

        return cls(redis_client(url), lease_s=lease_s)

    def acquire(
        self,
        limits: Limits,
        key: str,
        holder: str,
        waiter: str | None = None,
        run_id: str | None = None,
    ) -> Decision:
        rate, tokens = limits.rate, limits.tokens
        no_rate = Rate(1, 1.0)
        args: list[str | int] = [
            rate.count if rate else 0,
            _us(rate.window_s) if rate else 0,
            limits.concurrency or 0,
            tokens.count if tokens else 0,
            _us(tokens.window_s) if tokens else 0,
            holder,
            _us(self.lease_s),
            _us(self.poll_s),
            new_holder(),
            waiter or "",
        ]
        keys = [
            rate_key(key, rate or no_rate),
            slots_key(key),
            tokens_key(key, tokens or no_rate),
            waiters_key(key),
        ]
        sent = time.monotonic()
        try:
            wait_us, queued = (int(value) for value in self._acquire(keys=keys, args=args))
        except Exception as exc:
            return self._outage(key, exc)
        self._failures = 0
        if wait_us > 0:
            if queued and waiter and run_id:
                self._remember_wait(run_id, key, waiter, wait_us)
            return Decision(wait_s=wait_us / 1_000_000)
        if limits.concurrency is None:
            return Decision()
        slot = Slot(key, holder, self)
        self._keep(_Held(slot, limits.concurrency, sent + self.lease_s))
        return Decision(slot=slot)

    def _remember_wait(self, run_id: str, key: str, waiter: str, wait_us: int) -> None:
        """Record that ``waiter`` of ``run_id`` joined ``key``'s queue, so that the run's
        stop can take it out (``forget_waiters``). Once per waiter (its first refusal):
        one round trip more for a call that waits anyway, none for one that goes. A
        failure only costs the purge: the waiter is forgotten after its turn."""
        from pocoflow.distributed.control import CANCEL, flag_key

        member = json.dumps([key, waiter], separators=(",", ":"))
        ttl_ms = wait_us // 1000 + RUN_WAITS_TTL_S * 1000
        try:
            self._remember(keys=[run_waits_key(run_id)], args=[member, ttl_ms])
            # A cancel raises its flag before it purges: a purge that ran between this
            # waiter's ACQUIRE and the record above missed it, and the flag says so.
            # (Read after the record, in its own round trip: only on a first refusal.)
            if self.client.exists(flag_key(run_id, CANCEL)) and (
                self.run_cancelled is None or self.run_cancelled(run_id)
            ):
                pipe = self.client.pipeline(transaction=False)
                pipe.zrem(waiters_key(key), waiter)
                pipe.srem(run_waits_key(run_id), member)
                pipe.execute()
        except Exception as exc:
            _log.warning("Could not record limit waiter %s under %r: %s", waiter, key, exc)

    def forget_run(self, run_id: str) -> None:
        """A run of this process that waited here ended (a local run): its waiters
        leave the queues they joined."""
        forget_waiters(self.client, run_id)

    def release(self, slot: Slot) -> None:
        with self._lock:
            self._held.pop(slot.holder, None)
        self._forget(slot)

    def _forget(self, slot: Slot) -> None:
        try:
            self.client.zrem(slots_key(slot.key), slot.holder)
        except Exception as exc:  # the slot's lease frees it soon enough
            _log.warning("Could not release limit slot of %r: %s", slot.key, exc)

    def record_tokens(self, window: Rate, key: str, tokens: int) -> None:
        entry = f"{new_holder()}:{int(tokens)}"
        try:
            self._record(keys=[tokens_key(key, window)], args=[entry, _us(window.window_s)])
        except Exception as exc:
            _log.warning("Could not record %d tokens under limit key %r: %s", tokens, key, exc)

    def renew(self, slot: Slot) -> bool:
        """Extend the slot's lease; False when it was lost (or released already). A slot
        Redis forgot while its lease ran (restarted without persistence, flushed) is
        held again; one whose lease may have ended, only if its key has a free place."""
        with self._lock:
            held = self._held.get(slot.holder)
        return held is not None and self._renew_held(held) is True

    def _renew_held(self, held: _Held) -> bool | None:
        """One renewal (one round trip): True renewed, False lost, None released during
        the renewal (the call ended: whatever the renewal wrote is taken back)."""
        slot = held.slot
        sent = time.monotonic()
        running = sent < held.lease_ends - self.lease_s * LEASE_MARGIN
        args: list[str | int] = [slot.holder, _us(self.lease_s), held.concurrency, int(running)]
        try:
            state = int(self._renew(keys=[slots_key(slot.key)], args=args))
        except Exception as exc:  # Redis blinked: next beat tries again
            _log.warning("Could not renew limit slot of %r: %s", slot.key, exc)
            return True
        with self._lock:
            released = self._held.get(slot.holder) is not held
            if state and not released:
                held.lease_ends = sent + self.lease_s
        if released:
            # Released while the renewal was on its way: it may have put the holder back
            # after the release removed it (a slot nobody holds, until its lease ends).
            self._forget(slot)
            return None
        if state == 2:
            _log.warning(
                "Limit slot of %r (holder %s) was gone from Redis while its call ran "
                "(restarted without persistence? flushed?): it is held again",
                slot.key,
                slot.holder,
            )
        return state > 0

    # ── fail closed while Redis is away ──────────────────────────────────────

    def _outage(self, key: str, exc: Exception) -> Decision:
        wait = min(OUTAGE_WAIT_S * 2**self._failures, OUTAGE_WAIT_CAP_S)
        self._failures += 1
        _log.warning(
            "Limiter: Redis did not answer for limit key %r (%s); the call waits %.1fs "
            "(limits fail closed)",
            key,
            exc,
            wait,
        )
        return Decision(wait_s=wait)

    # ── slot renewal: one thread per process ────────────────────────────────

    def _keep(self, held: _Held) -> None:
        with self._lock:
            if self._pid != os.getpid():
                # A forked child: the parent's slots are the parent's to renew and release
                # (renewing one the parent released would put it back).
                self._held.clear()
            self._held[held.slot.holder] = held
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._pid = os.getpid()
                self._thread = threading.Thread(
                    target=self._renew_loop, name="pocoflow-limit-slots", daemon=True
                )
                self._thread.start()

    def _renew_loop(self) -> None:
        wake = threading.Event()
        while True:
            wake.wait(self.lease_s / 3)
            with self._lock:
                held = list(self._held.values())
            for one in held:
                with self._lock:  # released since the snapshot: a renewal would re-add it
                    if self._held.get(one.slot.holder) is not one:
                        continue
                if self._renew_held(one) is False:
                    _log.warning(
                        "Limit slot of %r (holder %s) expired before its call ended, and "
                        "its place was taken: the call runs on uncounted",
                        one.slot.key,
                        one.slot.holder,
                    )
                    with self._lock:
                        if self._held.get(one.slot.holder) is one:
                            del self._held[one.slot.holder]
