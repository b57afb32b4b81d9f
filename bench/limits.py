"""A rate-limit decision costs one Redis round trip (issue 7).

Figures from one private Redis, in the same run:

- commands sent per decision, from ``INFO commandstats`` before and after N decisions:
  the one ``EVALSHA`` (the Lua script's inner calls show as their own commands; they run
  inside Redis, not over the network, and are listed beside it);
- the time of N decisions against N ``EVALSHA`` of a script that only returns 0, with
  the same number of keys and arguments (one round trip, the same client-side packing),
  and against N ``PING``s, measured turn about. A second round trip would add a whole
  PING; the target is that a decision costs less than half a PING more than the bare
  ``EVALSHA``.

Run: ``python -m bench.limits``.
"""

from __future__ import annotations

import sys

import redis

from bench.common import alternate, report
from pocoflow.devcluster import start_redis
from pocoflow.distributed.limiter import RedisLimiter
from pocoflow.limits import Limits, Rate

N = 2000
#: Never refuses in the bench: every decision does the full work (prune, count, add).
LIMITS = Limits(rate=Rate(1_000_000, 1.0))


def command_counts(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name: int(value["calls"]) for name, value in stats.items()}


def commands_per_decision(client: redis.Redis, limiter: RedisLimiter, n: int) -> dict[str, float]:
    before = command_counts(client)
    for _ in range(n):
        limiter.acquire(LIMITS, "bench", "holder")
    after = command_counts(client)
    deltas = {k: (after.get(k, 0) - before.get(k, 0)) / n for k in after}
    deltas.pop("cmdstat_info", None)  # the INFO that read the stats
    return {k: v for k, v in deltas.items() if v > 0}


def main(n: int = N) -> bool:
    with start_redis() as server:
        client = redis.Redis.from_url(server.url)
        limiter = RedisLimiter(client, lease_s=30)
        limiter.acquire(LIMITS, "bench", "holder")  # loads the script (one NOSCRIPT miss)
        print(f"Rate-limit decisions on a private Redis ({n} each)")
        per = commands_per_decision(client, limiter, n)
        sent = per.pop("cmdstat_evalsha", 0.0)
        ok = report("commands sent per decision (EVALSHA)", sent, "cmd", "target 1", sent == 1)
        inner = ", ".join(f"{k.removeprefix('cmdstat_')} {v:g}" for k, v in sorted(per.items()))
        print(f"         run inside Redis by the script, per decision: {inner}")

        bare = client.register_script("return 0")
        # As many keys and arguments as a decision passes (limiter.ACQUIRE's header).
        keys, args = ["a", "b", "c", "d"], [1, 2, 3, 4, 5, "holder", 7, 8, "id", "waiter"]

        def decisions() -> None:
            for _ in range(n):
                limiter.acquire(LIMITS, "bench", "holder")

        def bare_scripts() -> None:
            for _ in range(n):
                bare(keys=keys, args=args)

        def pings() -> None:
            for _ in range(n):
                client.ping()

        bare_scripts()  # loads the bare script
        decide_s, bare_s = alternate(decisions, bare_scripts, repeat=5)
        _, ping_s = alternate(decisions, pings, repeat=3)
        extra = (decide_s - bare_s) / ping_s
        report("decision - bare EVALSHA, in PINGs", extra, "PING", "target < 0.5", extra < 0.5, 2)
        report(
            "one decision",
            decide_s / n * 1e6,
            "us",
            f"bare EVALSHA {bare_s / n * 1e6:.0f} us",
            None,
        )
        report("one PING (a round trip)", ping_s / n * 1e6, "us", "", None)
        ok &= extra < 0.5
        client.close()
    return ok


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
