"""Environment settings shared by the library, the CLI and the workers, and URL masking.

Every process (a CLI call, a Celery worker, the monitor) must agree on where the ledger
and the broker are, so they are read from one set of ``POCOFLOW_*`` variables, and the
CLI options of the same names only override them. Pure stdlib: the core and the CLI's
``--help`` import this without pulling in SQLAlchemy or Celery.

Secrets in URLs are never printed or logged: :func:`mask_url` is what every ``print``,
log line and ``repr`` of a URL goes through.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "DEFAULT_BROKER_URL",
    "DEFAULT_DB_URL",
    "ENV_VARS",
    "SQLITE_SYNCHRONOUS_MODES",
    "Settings",
    "default_redis_url",
    "mask_url",
    "parse_duration",
    "scrub_secrets",
]

DEFAULT_DB_URL = "sqlite:///pocoflow.db"
DEFAULT_BROKER_URL = "redis://localhost:6379/0"
DEFAULT_LEASE_SECONDS = 10.0
# G3 in 5 s: a dead worker is known 3 heartbeats (3 s) after its last one, and the next
# sweep (at most 1 s later) re-sends its steps: kill -9 -> re-run start <= ~4 s. The
# lease is only the backstop for a process that never wrote a heartbeat.
DEFAULT_SWEEP_SECONDS = 1.0
DEFAULT_HEARTBEAT_SECONDS = 1.0
DEFAULT_MAX_CRASHES = 3
DEFAULT_SQLITE_SYNCHRONOUS = "NORMAL"

#: Settings field -> environment variable. The CLI binds its options to the same names.
ENV_VARS: dict[str, str] = {
    "db_url": "POCOFLOW_DB_URL",
    "broker_url": "POCOFLOW_BROKER_URL",
    "redis_url": "POCOFLOW_REDIS_URL",
    "flows": "POCOFLOW_FLOWS",
    "lease_seconds": "POCOFLOW_LEASE_SECONDS",
    "sweep_seconds": "POCOFLOW_SWEEP_SECONDS",
    "heartbeat_seconds": "POCOFLOW_HEARTBEAT_SECONDS",
    "max_crashes": "POCOFLOW_MAX_CRASHES",
    "step_timeout": "POCOFLOW_STEP_TIMEOUT",
    "sqlite_synchronous": "POCOFLOW_SQLITE_SYNCHRONOUS",
    "prune_older_than": "POCOFLOW_PRUNE_OLDER_THAN",
}

_REDIS_SCHEMES = frozenset({"redis", "rediss"})
#: ``PRAGMA synchronous`` values a SQLite ledger accepts (here and in ``WorkflowDB``).
SQLITE_SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
_MASK = "***"  # the same token SQLAlchemy prints for a hidden password


@dataclass(frozen=True, repr=False)
class Settings:
    """Where the ledger, broker and control flags live, and the lease timings.

    Frozen because one value is built at start-up and handed to every component; a
    change means building a new one, never mutating a shared one. Values are checked on
    construction, so a bad lease fails at start-up, not deep inside a worker. The
    ``repr`` masks passwords, so logging a ``Settings`` is safe.
    """

    db_url: str = DEFAULT_DB_URL
    broker_url: str = DEFAULT_BROKER_URL
    #: Redis for control flags (cancel/pause). Left empty, it is the broker when the broker
    #: is ``redis://``/``rediss://``, else ``None``: control then rests on the ledger's
    #: ``control`` column alone.
    redis_url: str | None = ""
    #: Modules a worker imports so their ``@flow`` builders are registered.
    flows: tuple[str, ...] = ()
    #: How long a claimed step stays leased to one worker (G1, G3).
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    #: How often the sweeper re-enqueues unsent outbox rows and expired leases (G3).
    sweep_seconds: float = DEFAULT_SWEEP_SECONDS
    #: ``PRAGMA synchronous`` for SQLite ledgers in WAL mode.
    sqlite_synchronous: str = DEFAULT_SQLITE_SYNCHRONOUS
    #: Seconds (or ``"30d"``) after which workers' sweepers delete finished runs; None
    #: (default) keeps every run, because deleting history must be asked for.
    prune_older_than: float | None = None
    #: How often each worker process writes its liveness row; silent for 3 beats = dead,
    #: and the steps it ran or held are re-sent (G3).
    heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS
    #: Attempts of one step lost with their worker (killed, frozen, cut off) after which
    #: the run fails as a poison step instead of crashing workers forever.
    max_crashes: int = DEFAULT_MAX_CRASHES
    #: Default ``timeout`` (seconds per ``exec`` try) of every node; None = no limit. The
    #: node reads ``POCOFLOW_STEP_TIMEOUT`` itself; this checks it at start-up.
    step_timeout: float | None = None

    def __post_init__(self) -> None:
        # Here rather than in from_env, so Settings(...) built by hand is checked too.
        object.__setattr__(self, "flows", _split_flows(self.flows))
        object.__setattr__(self, "lease_seconds", _positive("lease_seconds", self.lease_seconds))
        object.__setattr__(self, "sweep_seconds", _positive("sweep_seconds", self.sweep_seconds))
        object.__setattr__(
            self, "heartbeat_seconds", _positive("heartbeat_seconds", self.heartbeat_seconds)
        )
        if self.step_timeout is not None:
            object.__setattr__(self, "step_timeout", _positive("step_timeout", self.step_timeout))
        try:
            crashes = int(self.max_crashes)
        except (TypeError, ValueError):
            crashes = 0
        if crashes < 1:
            raise ValueError(
                f"{ENV_VARS['max_crashes']} must be a whole number >= 1, got {self.max_crashes!r}"
            )
        object.__setattr__(self, "max_crashes", crashes)
        sync = str(self.sqlite_synchronous).strip().upper()
        if sync not in SQLITE_SYNCHRONOUS_MODES:
            raise ValueError(
                f"{ENV_VARS['sqlite_synchronous']} must be one of "
                f"{', '.join(SQLITE_SYNCHRONOUS_MODES)}, got {self.sqlite_synchronous!r}"
            )
        object.__setattr__(self, "sqlite_synchronous", sync)
        if self.prune_older_than is not None:
            age = parse_duration(self.prune_older_than, ENV_VARS["prune_older_than"])
            object.__setattr__(self, "prune_older_than", age)
        for name in ("db_url", "broker_url"):
            if not getattr(self, name):
                raise ValueError(f"{ENV_VARS[name]} must not be empty")
        if self.redis_url == "":
            object.__setattr__(self, "redis_url", default_redis_url(self.broker_url))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``env`` (default ``os.environ``), then apply ``overrides``.

        ``overrides`` are field names (``db_url=...``) and win over the environment; an
        override of ``None`` means "not given", so CLI options that default to ``None``
        can be passed straight through. An empty environment variable counts as unset,
        because compose files and CI matrices often export ``VAR=`` for "no value".

        ``redis_url`` defaults to the *final* broker URL when that is ``redis://`` or
        ``rediss://`` (so ``--broker-url redis://other`` moves the control flags too), and
        to ``None`` otherwise.

        Raises ``ValueError`` naming the variable for an unknown override or a bad value.
        """
        source = os.environ if env is None else env
        unknown = set(overrides) - set(ENV_VARS)
        if unknown:
            raise ValueError(
                f"unknown setting(s) {', '.join(sorted(unknown))}; known: {', '.join(ENV_VARS)}"
            )

        values: dict[str, Any] = {}
        for name, var in ENV_VARS.items():
            raw = source.get(var)
            if raw is not None and raw.strip() != "":
                values[name] = raw.strip()
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def masked(self) -> dict[str, Any]:
        """The settings as a dict with every URL password hidden: what ``pocoflow`` prints."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = mask_url(value) if f.name.endswith("_url") and value else value
        return out

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={v!r}" for k, v in self.masked().items())
        return f"Settings({body})"


def default_redis_url(broker_url: str) -> str | None:
    """The control-flag Redis to use when none is configured: the broker, if it is Redis."""
    scheme = broker_url.split("://", 1)[0].lower() if "://" in broker_url else ""
    return broker_url if scheme in _REDIS_SCHEMES else None


_DURATION = re.compile(r"(\d+(?:\.\d*)?)\s*([smhdw]?)", re.IGNORECASE)
_DURATION_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(value: str | float, what: str = "duration") -> float:
    """``"30d"``, ``"12h"``, ``"90m"``, ``"45s"``, ``"2w"`` or a number of seconds -> seconds."""
    if isinstance(value, int | float):
        number = float(value)
    else:
        match = _DURATION.fullmatch(str(value).strip())
        if match is None:
            raise ValueError(
                f"{what} must be a number of seconds or like 30d, 12h, 90m, got {value!r}"
            )
        number = float(match[1]) * _DURATION_UNIT_S[match[2].lower()]
    if not number >= 0:  # also rejects NaN
        raise ValueError(f"{what} must be >= 0, got {value!r}")
    return number


def _split_flows(value: str | Iterable[str]) -> tuple[str, ...]:
    """``"a.b, c"`` or ``["a.b", "c"]`` -> ``("a.b", "c")``; blanks dropped, order kept."""
    items = value.split(",") if isinstance(value, str) else value
    return tuple(s for s in (str(item).strip() for item in items) if s)


def _parse_float(name: str, raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{ENV_VARS[name]} must be a number of seconds, got {raw!r}") from None


def _positive(name: str, value: Any) -> float:
    number = _parse_float(name, value) if isinstance(value, str) else float(value)
    if not number > 0:  # also rejects NaN
        raise ValueError(f"{ENV_VARS[name]} must be > 0 seconds, got {value!r}")
    return number


# ── URL masking ──────────────────────────────────────────────────────────────

# Query parameters that carry secrets in driver URLs (libpq ``?password=``, redis-py
# ``?password=``, cloud brokers' tokens). Matched case-insensitively.
# Also matches libpq key=value DSNs ("host=h password='a b'").
_SECRET_PARAM = re.compile(
    r"(?P<lead>^|[?&;\s])(?P<name>[^=&;#\s]*(?:password|passwd|pwd|secret|token|"
    r"api_?key|access_?key|credential)[^=&;#\s]*)=(?P<value>'[^']*'?|[^&;#\s]*)",
    re.IGNORECASE,
)
# Several URLs in one setting (kombu failover "amqp://a;amqp://b", redis sentinels).
_URL_LIST_SEP = re.compile(r";(?=[A-Za-z][A-Za-z0-9+.-]*://)")


def mask_url(url: str | None) -> str:
    """Return ``url`` with every password replaced by ``***``; safe to print or log.

    Handles ``scheme://user:pw@host``, ``redis://:pw@host`` and a redis URL whose lone
    userinfo is a password (``redis://pw@host``, which Celery/kombu accept), secret
    query parameters (``?password=``, ``?sslpassword=``, ``?token=``), lists of URLs
    (``amqp://a;amqp://b``), libpq ``key=value`` strings, and malformed URLs
    whose password holds ``/``, ``?`` or ``#`` unescaped: when the host cannot be told
    apart from the secret, everything up to the last ``@`` is hidden. Errs on hiding too
    much, never too little. Anything without ``://`` (a file path) is returned unchanged;
    ``None`` becomes ``""``.
    """
    if url is None:
        return ""
    url = str(url)
    if _URL_LIST_SEP.search(url):
        return ";".join(mask_url(part) for part in _URL_LIST_SEP.split(url))
    scheme, sep, rest = url.partition("://")
    if not sep:
        return _mask_query(url)

    end = _authority_end(rest)
    authority, tail = rest[:end], rest[end:]

    if "@" in authority:
        userinfo, _, hostport = authority.rpartition("@")
        user, colon, password = userinfo.partition(":")
        if colon:
            masked = f"{user}:{_MASK}" if password else userinfo
        elif scheme.lower().split("+")[0] in _REDIS_SCHEMES and user:
            masked = _MASK  # redis://secret@host: kombu reads a lone userinfo as the password
        else:
            masked = userinfo
        return f"{scheme}://{masked}@{hostport}{_mask_query(tail)}"

    if _password_spilled(authority, tail):
        hostpart = rest.rpartition("@")[2]
        return f"{scheme}://{_MASK}@{_mask_query(hostpart)}"
    return f"{scheme}://{authority}{_mask_query(tail)}"


_SECRET_PIECE_SEP = re.compile(r"[:/?#;@&=\s']+")


def scrub_secrets(text: str, *urls: str | None) -> str:
    """``text`` (a client library's error message) with every piece of the secrets in
    ``urls`` replaced by ``***``.

    ``mask_url`` cleans the URL we print, but a client's error may quote the raw URL or a
    piece of it: redis-py and kombu read ``redis://:pa/ss@host`` as port ``pa`` and say
    "Port could not be cast to integer value as 'pa'". The userinfo (everything before
    the last ``@``) and secret query values are cut at URL delimiters and each piece of
    three characters or more is hidden wherever it appears; shorter pieces reveal too
    little to matter and would mangle ordinary words.
    """
    pieces: set[str] = set()
    for url in urls:
        for part in _URL_LIST_SEP.split(str(url or "")):
            rest = part.partition("://")[2]
            if "@" in rest:
                pieces.update(_SECRET_PIECE_SEP.split(rest.rpartition("@")[0]))
            for match in _SECRET_PARAM.finditer(part):
                pieces.update(_SECRET_PIECE_SEP.split(match["value"]))
    for piece in sorted((p for p in pieces if len(p) >= 3), key=len, reverse=True):
        text = text.replace(piece, _MASK)
    return text


def _authority_end(rest: str) -> int:
    """Index where ``user:pw@host:port`` ends: the first ``/``, ``?`` or ``#`` (RFC 3986)."""
    ends = [i for i in (rest.find(c) for c in "/?#") if i >= 0]
    return min(ends) if ends else len(rest)


def _password_spilled(authority: str, tail: str) -> bool:
    """True when an unescaped ``/``, ``?`` or ``#`` in a password cut the authority short.

    ``redis://:pa/ss@host`` parses as authority ``:pa``, path ``/ss@host``. We suspect
    that when the authority has a ``:`` and an ``@`` follows, and the authority does not
    look like a real ``host:port`` or the ``@`` sits in the path. An ``@`` in a plain
    path (``sqlite:///a@b.db``) or in the query of a real ``host:port`` is left alone.
    """
    if ":" not in authority or "@" not in tail:
        return False
    try:
        parts = urlsplit(f"x://{authority}")
        port_ok = parts.port is not None
        host_ok = bool(parts.hostname)
    except ValueError:  # "pa" is not a port
        return True
    path = tail.split("?", 1)[0].split("#", 1)[0]
    return not (port_ok and host_ok) or "@" in path


def _mask_query(text: str) -> str:
    if "=" not in text:
        return text
    return _SECRET_PARAM.sub(lambda m: f"{m['lead']}{m['name']}={_MASK}", text)
