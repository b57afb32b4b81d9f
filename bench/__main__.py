"""``make bench``: every benchmark, each figure beside a reference measured in this run.

PostgreSQL figures use POCOFLOW_BENCH_DATABASE_URL, or a private server started here.
Exit status 1 when a target is missed.
"""

from __future__ import annotations

import contextlib
import os
import sys

from bench import checkpoint_growth, core_overhead, ledger_overhead


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


def main() -> int:
    ok = core_overhead.main()
    with postgres_url() as pg_url:
        ok &= ledger_overhead.main(pg_url)
    ok &= checkpoint_growth.main()
    print("all targets met" if ok else "SOME TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
