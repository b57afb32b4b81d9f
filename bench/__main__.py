"""``make bench``: every benchmark, each figure beside a reference measured in this run.

PostgreSQL figures use POCOFLOW_BENCH_DATABASE_URL, or a private server started here
(the ledger-scale and load sections create databases on it, so its user needs CREATEDB).
The distributed sections each start a private Redis and their own worker processes, and
stop all of them on the way out, even when a measurement fails (which fails that section
and goes on with the next). Exit status 1 when a target is missed.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Callable

from bench import (
    budget_check,
    checkpoint_growth,
    core_overhead,
    distributed_latency,
    distributed_throughput,
    ledger_overhead,
    ledger_scale,
    limits,
    load,
    local_map,
    monitor,
    recovery,
    step_cost,
)


@contextlib.contextmanager
def postgres_url():
    url = os.environ.get("POCOFLOW_BENCH_DATABASE_URL")
    if url:
        yield url
        return
    sys.path.insert(0, ".")
    from tests.servers import start_postgres

    with start_postgres(durable=True) as server:
        yield server.url


def section(measure: Callable[[], bool]) -> bool:
    """Run one section; an error fails it (with its traceback) but not the sections after."""
    try:
        return measure()
    except Exception:
        traceback.print_exc()
        print("  [FAIL] the section above stopped with an error")
        return False


def main() -> int:
    ok = core_overhead.main()
    with postgres_url() as pg_url:
        ok &= ledger_overhead.main(pg_url)
        ok &= section(lambda: local_map.main(pg_url))
        ok &= section(lambda: step_cost.main(pg_url) or True)  # figures only, no target
        ok &= section(lambda: ledger_scale.main(pg_url))
        ok &= section(lambda: budget_check.main(pg_url))  # figures only, no target
        ok &= section(lambda: load.main(server_url=pg_url))
        ok &= section(lambda: monitor.main(pg_url))
    ok &= checkpoint_growth.main()
    ok &= section(distributed_latency.main)
    ok &= section(distributed_throughput.main)
    ok &= section(recovery.main)
    ok &= section(limits.main)
    print("all targets met" if ok else "SOME TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
