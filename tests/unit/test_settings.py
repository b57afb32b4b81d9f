"""Settings from the environment, and URL masking (secrets never printed or logged)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

import pocoflow.settings
from pocoflow.settings import ENV_VARS, Settings, default_redis_url, mask_url

settings_file = pocoflow.settings.__file__

pytestmark = pytest.mark.unit


# ── defaults and overrides ───────────────────────────────────────────────────


def test_defaults_from_an_empty_environment() -> None:
    s = Settings.from_env({})
    assert s.db_url == "sqlite:///pocoflow.db"
    assert s.broker_url == "redis://localhost:6379/0"
    assert s.redis_url == "redis://localhost:6379/0"
    assert s.flows == ()
    assert s.lease_seconds == 10.0
    assert s.sweep_seconds == 1.0
    assert (s.heartbeat_seconds, s.max_crashes, s.step_timeout) == (1.0, 3, None)
    assert s.sqlite_synchronous == "NORMAL"


def test_constructor_defaults_equal_from_env_defaults() -> None:
    assert Settings() == Settings.from_env({})


def test_reads_os_environ_when_no_mapping_given(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ENV_VARS.values():
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("POCOFLOW_DB_URL", "sqlite:////tmp/x.db")
    assert Settings.from_env().db_url == "sqlite:////tmp/x.db"


def test_every_variable_is_read() -> None:
    env = {
        "POCOFLOW_DB_URL": "postgresql+psycopg://u:pw@db/pf",
        "POCOFLOW_BROKER_URL": "amqp://guest:guest@mq//",
        "POCOFLOW_REDIS_URL": "redis://flags:6379/3",
        "POCOFLOW_FLOWS": "app.flows, other.flows",
        "POCOFLOW_LEASE_SECONDS": "2.5",
        "POCOFLOW_SWEEP_SECONDS": "1",
        "POCOFLOW_SQLITE_SYNCHRONOUS": "full",
    }
    s = Settings.from_env(env)
    assert s.db_url == env["POCOFLOW_DB_URL"]
    assert s.broker_url == env["POCOFLOW_BROKER_URL"]
    assert s.redis_url == "redis://flags:6379/3"
    assert s.flows == ("app.flows", "other.flows")
    assert s.lease_seconds == 2.5
    assert s.sweep_seconds == 1.0
    assert s.sqlite_synchronous == "FULL"


def test_overrides_win_and_none_means_not_given() -> None:
    env = {"POCOFLOW_DB_URL": "sqlite:///env.db", "POCOFLOW_LEASE_SECONDS": "7"}
    s = Settings.from_env(env, db_url="sqlite:///cli.db", lease_seconds=None)
    assert s.db_url == "sqlite:///cli.db"
    assert s.lease_seconds == 7.0


def test_empty_variable_counts_as_unset() -> None:
    s = Settings.from_env({"POCOFLOW_DB_URL": "", "POCOFLOW_REDIS_URL": "  "})
    assert s.db_url == "sqlite:///pocoflow.db"
    assert s.redis_url == s.broker_url


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("a", ("a",)),
        ("a.b, c ,, d", ("a.b", "c", "d")),
        (["x", " y ", ""], ("x", "y")),
        ((), ()),
    ],
)
def test_flows_are_split_and_trimmed(raw: object, expected: tuple[str, ...]) -> None:
    assert Settings.from_env({}, flows=raw).flows == expected


def test_settings_are_frozen() -> None:
    s = Settings.from_env({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.db_url = "sqlite:///other.db"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("env", "var"),
    [
        ({"POCOFLOW_LEASE_SECONDS": "soon"}, "POCOFLOW_LEASE_SECONDS"),
        ({"POCOFLOW_LEASE_SECONDS": "0"}, "POCOFLOW_LEASE_SECONDS"),
        ({"POCOFLOW_LEASE_SECONDS": "nan"}, "POCOFLOW_LEASE_SECONDS"),
        ({"POCOFLOW_SWEEP_SECONDS": "-1"}, "POCOFLOW_SWEEP_SECONDS"),
        ({"POCOFLOW_SQLITE_SYNCHRONOUS": "fast"}, "POCOFLOW_SQLITE_SYNCHRONOUS"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], var: str) -> None:
    with pytest.raises(ValueError, match=var):
        Settings.from_env(env)


def test_unknown_override_is_refused() -> None:
    with pytest.raises(ValueError, match="db_ulr"):
        Settings.from_env({}, db_ulr="sqlite://")


# ── redis_url defaulting ─────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("broker", "redis"),
    [
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
        ("redis://:pw@cache:6380/2", "redis://:pw@cache:6380/2"),
        ("rediss://:pw@cache:6380/2", "rediss://:pw@cache:6380/2"),
        ("REDIS://cache/1", "REDIS://cache/1"),
        ("amqp://guest:guest@mq//", None),
        ("memory://", None),
        ("sqla+sqlite:///broker.db", None),
    ],
)
def test_redis_url_defaults_to_a_redis_broker_only(broker: str, redis: str | None) -> None:
    assert Settings.from_env({"POCOFLOW_BROKER_URL": broker}).redis_url == redis
    assert default_redis_url(broker) == redis


def test_redis_url_follows_an_overridden_broker() -> None:
    env = {"POCOFLOW_BROKER_URL": "amqp://mq//"}
    assert Settings.from_env(env, broker_url="redis://other/1").redis_url == "redis://other/1"


def test_explicit_redis_url_wins_over_the_broker() -> None:
    env = {"POCOFLOW_BROKER_URL": "redis://broker/0", "POCOFLOW_REDIS_URL": "redis://flags/5"}
    assert Settings.from_env(env).redis_url == "redis://flags/5"
    assert Settings.from_env(
        {"POCOFLOW_BROKER_URL": "amqp://mq//"}, redis_url="redis://f/1"
    ).redis_url == ("redis://f/1")


def test_hand_built_settings_derive_redis_url_too() -> None:
    assert Settings(broker_url="amqp://mq//").redis_url is None
    assert Settings(broker_url="redis://b/2").redis_url == "redis://b/2"
    assert Settings(broker_url="amqp://mq//", redis_url=None).redis_url is None


# ── masking ──────────────────────────────────────────────────────────────────

SECRET = "s3cr3t-PW"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"redis://:{SECRET}@cache:6379/0", "redis://:***@cache:6379/0"),
        (f"rediss://:{SECRET}@cache:6380/1", "rediss://:***@cache:6380/1"),
        (f"redis://default:{SECRET}@cache/0", "redis://default:***@cache/0"),
        (f"redis://{SECRET}@cache/0", "redis://***@cache/0"),
        (f"postgresql://user:{SECRET}@db/pocoflow", "postgresql://user:***@db/pocoflow"),
        (
            f"postgresql+psycopg://user:{SECRET}@db:5432/pf?sslmode=require",
            "postgresql+psycopg://user:***@db:5432/pf?sslmode=require",
        ),
        (
            f"postgresql://user:{SECRET}@h1:5432,h2:5432/pf",
            "postgresql://user:***@h1:5432,h2:5432/pf",
        ),
        (f"amqp://guest:{SECRET}@mq//", "amqp://guest:***@mq//"),
        (f"amqp://guest:{SECRET}@mq:5672/vhost", "amqp://guest:***@mq:5672/vhost"),
        (f"redis://:{SECRET}@[::1]:6379/0", "redis://:***@[::1]:6379/0"),
        (
            f"postgresql://db/pf?user=u&password={SECRET}&sslmode=x",
            "postgresql://db/pf?user=u&password=***&sslmode=x",
        ),
        (f"redis://cache/0?password={SECRET}", "redis://cache/0?password=***"),
        (
            f"sentinel://:{SECRET}@s1:26379;sentinel://:{SECRET}@s2:26379",
            "sentinel://:***@s1:26379;sentinel://:***@s2:26379",
        ),
        (f"host=db user=u password={SECRET} dbname=pf", "host=db user=u password=*** dbname=pf"),
    ],
)
def test_mask_url_hides_the_password(url: str, expected: str) -> None:
    masked = mask_url(url)
    assert masked == expected
    assert SECRET not in masked


@pytest.mark.parametrize(
    ("url", "password", "rest"),
    [
        # Unescaped reserved characters in the password cut the authority short; the
        # mask must still hide all of it (and may hide more).
        ("redis://:pa/ss@cache/0", "pa/ss", "cache/0"),
        ("redis://:pa?ss@cache/0", "pa?ss", "cache/0"),
        ("redis://:pa#ss@cache/0", "pa#ss", "cache/0"),
        ("redis://:12/34@cache/0", "12/34", "cache/0"),
        ("redis://u:12/34@cache/0", "12/34", "cache/0"),
        ("amqp://guest:pa/ss@mq//", "pa/ss", "mq//"),
        ("postgresql://user:p@ss@db/pf", "p@ss", "db/pf"),
        ("postgresql://user:p%40ss%2F@db/pf", "p%40ss%2F", "db/pf"),
    ],
)
def test_mask_url_never_leaks_a_malformed_password(url: str, password: str, rest: str) -> None:
    masked = mask_url(url)
    for piece in {password, *password.replace("?", "/").replace("#", "/").split("/")}:
        assert piece not in masked, masked
    assert masked.endswith("***@" + rest), masked


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///pocoflow.db",
        "sqlite:////var/lib/pf/a@b.db",
        "sqlite://",
        "redis://localhost:6379/0",
        "redis://[::1]:6379/0",
        "redis://user:@cache/0",
        "memory://",
        "postgresql://user@db/pf",
        "redis://cache:6379/0?label=a@b",
        "pocoflow.db",
        "/abs/path/pocoflow.db",
    ],
)
def test_mask_url_leaves_urls_without_secrets_alone(url: str) -> None:
    assert mask_url(url) == url


def test_mask_url_of_none_is_empty() -> None:
    assert mask_url(None) == ""


def test_repr_and_masked_hide_passwords() -> None:
    s = Settings.from_env(
        {
            "POCOFLOW_DB_URL": f"postgresql://u:{SECRET}@db/pf",
            "POCOFLOW_BROKER_URL": f"redis://:{SECRET}@cache/0",
        }
    )
    assert SECRET not in repr(s)
    assert SECRET not in str(s)
    assert SECRET not in str(s.masked())
    assert s.masked()["db_url"] == "postgresql://u:***@db/pf"
    assert s.db_url.endswith(f"{SECRET}@db/pf")  # the real value is untouched


def test_settings_module_imports_no_heavy_dependency() -> None:
    # Load the file on its own so the check is about settings.py, not the package __init__.
    code = (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('pf_settings', {str(settings_file)!r}); "
        "mod = importlib.util.module_from_spec(spec); sys.modules['pf_settings'] = mod; "
        "spec.loader.exec_module(mod); "
        "bad = [m for m in ('sqlalchemy', 'celery', 'redis', 'pocoflow') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_recovery_settings_come_from_the_environment_and_are_checked() -> None:
    env = {
        "POCOFLOW_HEARTBEAT_SECONDS": "0.5",
        "POCOFLOW_MAX_CRASHES": "5",
        "POCOFLOW_STEP_TIMEOUT": "30",
    }
    s = Settings.from_env(env)
    assert (s.heartbeat_seconds, s.max_crashes, s.step_timeout) == (0.5, 5, 30.0)
    for var, bad in [
        ("POCOFLOW_MAX_CRASHES", "0"),
        ("POCOFLOW_MAX_CRASHES", "many"),
        ("POCOFLOW_STEP_TIMEOUT", "-1"),
        ("POCOFLOW_HEARTBEAT_SECONDS", "0"),
    ]:
        with pytest.raises(ValueError, match=var):
            Settings.from_env({var: bad})
