"""The worker image's recipe works outside Docker (no Docker daemon here): the files its
``COPY`` lines name are copied into a scratch directory, its ``RUN pip install`` runs in
a fresh venv, and its ``CMD`` starts a worker that runs the example flow to the end on a
private Redis and a SQLite ledger.

Read from workers/Dockerfile itself, so a file the image forgets to copy, an extra it
lacks or a start command that no longer exists fails here. Not covered: the base
image's system packages and the non-root user (that needs Docker)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pocoflow import devcluster
from tests.distributed.conftest import fresh_redis_db
from tests.distributed.faults import REPO_ROOT

pytestmark = pytest.mark.distributed

DOCKERFILE = REPO_ROOT / "workers" / "Dockerfile"
INSTALL_TIMEOUT_S = 600
TIMEOUT_S = 90


def recipe() -> tuple[list[tuple[str, str]], str, list[str]]:
    """(COPY src/dest pairs, the pip install command with ARGs filled in, CMD argv)."""
    text = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    copies = re.findall(r"^COPY (\S+) (\S+)$", text, re.M)
    (install,) = re.findall(r"^RUN (pip install .+)$", text, re.M)
    for name, value in args.items():
        install = install.replace(f"${{{name}}}", value)
    (cmd,) = re.findall(r"^CMD (\[.+\])$", text, re.M)
    return copies, install, json.loads(cmd)


@pytest.fixture(scope="module")
def image() -> Iterator[tuple[Path, Path]]:
    """(the app directory, the venv's bin directory), built as the Dockerfile says."""
    scratch = Path(tempfile.mkdtemp(prefix="pocoflow-image-"))
    app, venv = scratch / "app", scratch / "venv"
    app.mkdir()
    copies, install, _ = recipe()
    for src, dest in copies:
        source, target = REPO_ROOT / src, app / dest
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=120)
    # The Dockerfile's own command, with the venv's pip for the image's.
    argv = [str(venv / "bin" / "pip"), *install.split()[1:]]
    done = subprocess.run(
        [a.strip('"') for a in argv], cwd=app, capture_output=True, text=True,
        timeout=INSTALL_TIMEOUT_S,
    )  # fmt: skip
    assert done.returncode == 0, f"{install} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    try:
        yield app, venv / "bin"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def test_the_image_installs_and_its_worker_runs_the_example(
    image: tuple[Path, Path], redis_url: str
) -> None:
    app, bin_dir = image
    _, _, cmd = recipe()
    assert cmd[0] == "pocoflow" and (bin_dir / "pocoflow").exists()
    broker = fresh_redis_db(redis_url)
    db_url = f"sqlite:///{app / 'ledger.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POCOFLOW_", "PYTHON"))}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        POCOFLOW_DB_URL=db_url,
        POCOFLOW_BROKER_URL=broker,
        POCOFLOW_FLOWS="examples.article",
    )
    log = app / "worker.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [str(bin_dir / cmd[0]), *cmd[1:]], cwd=app, env=env, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    worker = devcluster.WorkerProcess("image", proc, log)
    try:
        worker.wait_ready(TIMEOUT_S)
        # Submitted with the image's own CLI, as the compose file's submit job does.
        done = subprocess.run(
            [str(bin_dir / "pocoflow"), "submit", "article", "--store",
             '{"topic": "durable workflows"}', "--wait"],
            cwd=app, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
        )  # fmt: skip
        assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{worker.log()[-3000:]}"
        assert "completed" in done.stdout + done.stderr
    finally:
        worker.kill()
