"""``pocoflow doctor``: is what the settings name reachable and right? One line each.

Every check returns a ``Check`` instead of raising, so one broken part does not hide
the state of the others, and the same checks serve ``submit`` (a broker it cannot reach
is refused before a run is recorded). Secrets in URLs are masked in every line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from pocoflow.settings import Settings, mask_url, scrub_secrets

#: How long one check may wait for a server before it says it is unreachable.
CHECK_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.name:<8} {self.detail}"


def broker_problem(url: str, timeout_s: float = CHECK_TIMEOUT_S) -> str | None:
    """Why the broker at ``url`` cannot be reached, or None when it answers."""
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=timeout_s, transport_options={
            "socket_connect_timeout": timeout_s, "socket_timeout": timeout_s,
            "max_retries": 0,
        }) as conn:  # fmt: skip
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=timeout_s)
    except Exception as exc:
        return scrub_secrets(f"{type(exc).__name__}: {exc}", url)
    return None


def broker_refusal(url: str, outcome: str) -> str | None:
    """Why nothing should be recorded for the workers now (``outcome`` says what was
    not done), or None when the broker at ``url`` answers: a run whose first step no
    broker took would only wait in the ledger, silently, for a worker's sweeper that may
    never come."""
    problem = broker_problem(url)
    if not problem:
        return None
    return (
        f"the broker {mask_url(url)} cannot be reached ({problem}); {outcome}. Check it "
        "with `pocoflow doctor`"
    )


def check_broker(settings: Settings) -> Check:
    problem = broker_problem(settings.broker_url)
    where = mask_url(settings.broker_url)
    if problem:
        return Check("broker", False, f"{where} cannot be reached: {problem}")
    return Check("broker", True, f"{where} reachable")


def check_redis(settings: Settings) -> Check:
    """The Redis of the cancel/pause flags and the shared limits."""
    if not settings.redis_url:
        return Check(
            "redis",
            False,
            "no POCOFLOW_REDIS_URL (and the broker is not Redis): cancel flags and node "
            "limits have no Redis",
        )
    import redis

    where = mask_url(settings.redis_url)
    try:
        client = redis.Redis.from_url(
            settings.redis_url,
            socket_timeout=CHECK_TIMEOUT_S,
            socket_connect_timeout=CHECK_TIMEOUT_S,
        )
        started = time.perf_counter()
        client.ping()
        took_ms = (time.perf_counter() - started) * 1000
        client.close()
    except Exception as exc:
        problem = scrub_secrets(f"{type(exc).__name__}: {exc}", settings.redis_url)
        return Check("redis", False, f"{where} cannot be reached: {problem}")
    return Check("redis", True, f"{where} answers PING in {took_ms:.1f} ms")


def check_ledger(settings: Settings) -> tuple[Check, Any]:
    """The ledger's schema revision against this version's, without migrating it."""
    from sqlalchemy import create_engine

    from pocoflow.ledger.engine import resolve_url, sqlite_file
    from pocoflow.ledger.migrate import HEAD, REVISIONS, schema_version

    where = mask_url(settings.db_url)
    path = sqlite_file(settings.db_url)
    if path is not None and not path.is_file():  # opening it would create an empty file
        return Check("ledger", False, f"{where} does not exist"), None
    try:
        engine = create_engine(resolve_url(settings.db_url), hide_parameters=True)
        with engine.connect() as conn:
            version, has_v02 = schema_version(conn)
        engine.dispose()
    except Exception as exc:
        return Check("ledger", False, f"{where} cannot be opened: {type(exc).__name__}"), None
    if version is None and not has_v02:
        return Check("ledger", False, f"{where} is not a PocoFlow ledger (no tables)"), None
    if version is not None and version not in REVISIONS:
        return (
            Check(
                "ledger",
                False,
                f"{where} at schema {version}, newer than this pocoflow knows (head {HEAD}): "
                "upgrade pocoflow to use it",
            ),
            None,
        )
    if version != HEAD:
        found = version or "0.2 (no version table)"
        return (
            Check(
                "ledger",
                True,
                f"{where} at schema {found}; this version migrates it to {HEAD} when it "
                "first opens it",
            ),
            None,
        )
    from pocoflow.db import WorkflowDB

    return Check("ledger", True, f"{where} at schema {HEAD} (current)"), WorkflowDB(settings.db_url)


def check_workers(settings: Settings, db: Any) -> list[Check]:
    """Worker processes that beat in the ledger lately, and the queues the live ones
    consume (asked over the broker; a worker that does not answer in time is listed
    without them)."""
    from pocoflow.distributed.liveness import dead_after
    from pocoflow.ledger.liveness import last_beats

    if db is None:
        return []
    now = db.clock()
    beats = last_beats(db)
    limit = dead_after(settings.heartbeat_seconds)
    live = sorted(w for w, at in beats.items() if now - at <= limit)
    if not live:
        return [Check("workers", False, "no worker process beat in the last "
                      f"{limit:g} s: start one with `pocoflow worker`")]  # fmt: skip
    queues = _queues(settings)
    lines = [Check("workers", True, f"{len(live)} live worker process(es)")]
    for name, consumed in sorted(queues.items()):
        lines.append(Check("worker", True, f"{name} consumes {', '.join(consumed)}"))
    return lines


def _queues(settings: Settings) -> dict[str, list[str]]:
    try:
        from pocoflow.distributed.celery_app import create_app

        app = create_app(settings)
        replies = app.control.inspect(timeout=1.0).active_queues() or {}
    except Exception:
        return {}
    return {node: sorted(q["name"] for q in queues) for node, queues in replies.items()}


def run_checks(settings: Settings) -> list[Check]:
    ledger, db = check_ledger(settings)
    checks = [ledger, check_broker(settings), check_redis(settings)]
    if checks[1].ok:
        checks += check_workers(settings, db)
    return checks
