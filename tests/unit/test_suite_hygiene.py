"""The suite's own rules: every test carries exactly its folder's marker (so ``-m unit``
selects every unit test and nothing else), and a Redis given by URL is never emptied
without its owner's say."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import (
    FOLDER_MARKERS,
    REDIS_ENV,
    REDIS_FLUSH_ENV,
    TESTS_ROOT,
    external_redis_url,
    folder_marker,
    folder_markers_of,
)

ROOT = TESTS_ROOT.parent


def test_every_collected_test_here_carries_its_folder_marker(request: pytest.FixtureRequest):
    items = request.session.items
    assert items
    for item in items:
        assert folder_markers_of(item) == {folder_marker(item.path)}, item.nodeid


def collected(*args: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode in (0, 5), done.stdout + done.stderr  # 5: none selected
    return [line for line in done.stdout.splitlines() if "::" in line]


def test_each_marker_selects_exactly_its_folder():
    everything = collected()
    assert len(everything) > 500
    selections = {marker: collected("-m", marker) for marker in ("unit", "ledger")}
    for marker, selected in selections.items():
        # Counted, not compared by id: some ids hold a set's repr, which varies per process.
        wanted = [t for t in everything if t.startswith(f"tests/{marker}/")]
        assert all(t.startswith(f"tests/{marker}/") for t in selected), marker
        assert len(selected) == len(wanted), marker
    # test_flow_runs.py has no pytestmark of its own: the folder gives it one.
    assert any(t.startswith("tests/ledger/test_flow_runs.py::") for t in selections["ledger"])
    unmarked = " or ".join(sorted(set(FOLDER_MARKERS.values())))
    assert collected("-m", f"not ({unmarked})") == []


def test_a_test_redis_url_is_refused_unless_flushing_is_allowed():
    url = "redis://127.0.0.1:6379/0"
    assert external_redis_url({}) is None
    with pytest.raises(pytest.UsageError) as refused:
        external_redis_url({REDIS_ENV: url})
    message = str(refused.value)
    assert url in message and "FLUSHDB" in message and f"{REDIS_FLUSH_ENV}=1" in message
    with pytest.raises(pytest.UsageError):
        external_redis_url({REDIS_ENV: url, REDIS_FLUSH_ENV: "0"})
    assert external_redis_url({REDIS_ENV: url, REDIS_FLUSH_ENV: "1"}) == url


def test_the_suite_refuses_a_users_redis_before_running_anything():
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
         "tests/unit/test_message.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, REDIS_ENV: "redis://127.0.0.1:1/0"},
    )  # fmt: skip
    assert done.returncode == 4, done.stdout + done.stderr  # usage error
    assert "FLUSHDB" in done.stderr and REDIS_FLUSH_ENV in done.stderr
