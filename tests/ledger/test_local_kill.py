"""A local ``Flow.run(db_path=...)`` process killed with kill -9 mid-step, then resumed:
the run ends with exactly the Store of an uninterrupted run, one checkpoint per step
(G1, G2), on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pocoflow.db import WorkflowDB
from tests.helpers import wait_until
from tests.ledger.local_kill_flows import build

pytestmark = pytest.mark.ledger

ROOT = Path(__file__).resolve().parents[2]


def test_a_local_run_killed_with_kill_9_resumes_to_the_exact_store(
    ledger_url: str, tmp_path: Path
) -> None:
    side = tmp_path / "side"
    side.mkdir()
    (side / "block").touch()
    run_id = "local_kill-0000dead"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.ledger.local_kill_flows", ledger_url, run_id, str(side)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        pid = int(wait_until(lambda: (side / "pid").exists() and (side / "pid").read_text(), 60))
        assert pid == proc.pid  # step 1 is running in that process now
    finally:
        proc.send_signal(signal.SIGKILL)
        output = proc.communicate(timeout=30)[0]
    assert proc.returncode == -signal.SIGKILL, output
    db = WorkflowDB(ledger_url)
    try:
        assert db.get_run(run_id)["status"] == "running"  # nobody could record the end
        assert [c["step"] for c in db.get_checkpoints(run_id)] == [0]
        (side / "block").unlink()
        store = build(ledger_url).resume(run_id)
        expected = build(f"sqlite:///{tmp_path / 'straight.db'}").run({"n": 0, "side": str(side)})
        assert (
            store.as_dict()
            == expected.as_dict()
            == {
                "n": 4,
                "side": str(side),
                "trail": ["a", "b", "c", "d"],
            }
        )
        assert db.get_run(run_id)["status"] == "completed"
        assert [c["step"] for c in db.get_checkpoints(run_id)] == [0, 1, 2, 3]
        assert db.load_checkpoint(run_id, 3).as_dict() == expected.as_dict()
    finally:
        db.close()
