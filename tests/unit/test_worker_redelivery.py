"""The worker tasks send a message that met an unreachable ledger back for as long as the
ledger stays away: a step must not be dropped after Celery's default 3 retries (a
PostgreSQL outage longer than 1 + 2 + 4 s did that; the chaos rounds' connection kills
found runs stalled a minute on the queue backstop). In a subprocess, because importing
``workers.app`` configures the process (settings, executor context, flow imports); the
task runs eagerly there, with the executor's outcome stubbed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
SCRIPT = """
import sys
import workers.app as worker

outcomes = iter(["ledger_unreachable"] * 8 + ["committed"])
worker.execute_step = lambda message, task_id=None: next(outcomes)
worker.execute_item = lambda message, task_id=None: next(outcomes)
worker.redelivery_delay = lambda retries: 0
task = getattr(worker, sys.argv[1])
print(task.apply(args=[{}]).get())
"""


@pytest.mark.parametrize("task", ["step", "item"])
def test_a_message_is_redelivered_for_as_long_as_the_ledger_is_unreachable(
    task: str, tmp_path: Path
) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "POCOFLOW_DB_URL": f"sqlite:///{tmp_path / 'ledger.db'}",
        "POCOFLOW_BROKER_URL": "memory://",
        "PYTHONPATH": str(REPO),
    }
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, task],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "committed"
