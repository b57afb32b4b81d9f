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


def suite_markers(session: pytest.Session) -> list[list[str]]:
    """``[nodeid, markers]`` of every test of the suite: this session's own items when it
    collected every folder (a whole-suite run: no second collection), else from one
    collection of the whole suite in a subprocess."""
    folders = {item.path.relative_to(TESTS_ROOT).parts[0] for item in session.items}
    if folders >= set(FOLDER_MARKERS) and len(session.items) > 1000:
        return [[item.nodeid, ",".join(sorted(folder_markers_of(item)))] for item in session.items]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "-p", "tests.marker_report"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return [
        line.removeprefix("MARKERS ").rsplit(" ", 1)
        for line in done.stdout.splitlines()
        if line.startswith("MARKERS ")
    ]


def test_each_test_of_the_suite_carries_exactly_its_folder_marker(request: pytest.FixtureRequest):
    """The markers each test of the whole suite ends up with: ``-m unit`` then selects
    every test of tests/unit and nothing else, and so on."""
    lines = suite_markers(request.session)
    assert len(lines) > 500
    by_folder: dict[str, int] = {}
    for nodeid, markers in lines:
        folder = nodeid.split("/")[1]
        assert markers == folder, nodeid  # exactly one: its folder's
        by_folder[folder] = by_folder.get(folder, 0) + 1
    # Before the hook: -m unit took 110 of 398 unit tests, -m examples none, and -m ledger
    # missed tests/ledger/test_flow_runs.py.
    assert by_folder["unit"] > 390 and by_folder["examples"] > 10
    assert any(n.startswith("tests/ledger/test_flow_runs.py::") for n, m in lines if m == "ledger")


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


def test_test_processes_sharing_one_redis_get_databases_of_their_own():
    from tests.distributed.conftest import _own_redis_dbs

    shared = {REDIS_ENV: "redis://127.0.0.1:6379/0", "PYTEST_XDIST_WORKER_COUNT": "2"}
    first = _own_redis_dbs({**shared, "PYTEST_XDIST_WORKER": "gw0"})
    second = _own_redis_dbs({**shared, "PYTEST_XDIST_WORKER": "gw1"})
    assert first and second and not set(first) & set(second)
    assert set(first) | set(second) == set(range(1, 16))
    # A replacement for a crashed process (xdist names it gw2) still gets databases.
    assert _own_redis_dbs({**shared, "PYTEST_XDIST_WORKER": "gw2"}) == first
    # Private servers: each process has all of its own Redis, however many processes.
    alone = {"PYTEST_XDIST_WORKER": "gw7", "PYTEST_XDIST_WORKER_COUNT": "16"}
    assert _own_redis_dbs(alone) == list(range(1, 16))
