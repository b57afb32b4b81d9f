"""``bench.cpu``: the CPU a load's parts used, read from /proc (Linux only)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench import cpu
from tests.helpers import wait_until

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")

BURN = (
    "import sys, time\n"
    "t = time.process_time()\n"
    "while time.process_time() - t < 0.3: pass\n"
    "print('burnt', flush=True)\n"
    "sys.stdin.read()\n"
)


def test_a_tree_counts_a_live_child_and_then_the_same_child_reaped() -> None:
    me = os.getpid()
    own_before, tree_before = cpu.own_s(me), cpu.tree_s(me)
    with subprocess.Popen(
        [sys.executable, "-c", BURN], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as child:
        assert child.stdout is not None and child.stdout.readline() == b"burnt\n"
        assert cpu.tree_s(me) - tree_before >= 0.25  # live: counted as a descendant
        assert cpu.own_s(me) - own_before < 0.25  # not yet reaped: not in our own
        child.communicate()  # closes its stdin: it ends, and is reaped
    wait_until(lambda: cpu.own_s(me) - own_before >= 0.25, 5)  # reaped: cutime has it


def test_per_step_figures_are_the_difference_per_step_by_part() -> None:
    text = cpu.per_step_us({"a": 1.0, "b": 0.0}, {"a": 1.5, "b": 0.25}, 1000)
    assert text == "a 500, b 250; all 750 us"
    assert cpu.per_step_us({}, {"a": 0.0}, 10) == "no /proc here: not measured"


# A stand-in for a Celery main process: on "go" it starts a pool child that burns 0.3 s
# of CPU and ends (as a replaced prefork child does), reaps it, and says so.
MAIN = (
    "import subprocess, sys\n"
    "sys.stdin.readline()\n"
    "burn = 'import time\\nt = time.process_time()\\nwhile time.process_time() - t < 0.3: pass'\n"
    "subprocess.run([sys.executable, '-c', burn], check=True)\n"
    "print('done', flush=True)\n"
    "sys.stdin.read()\n"
)


def test_a_replaced_pool_childs_cpu_stays_with_the_pool_children() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", MAIN], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as main:
        assert main.stdin is not None and main.stdout is not None
        probes = cpu.worker_probes([main.pid])
        before = cpu.snapshot(probes)
        main.stdin.write(b"go\n")
        main.stdin.flush()
        assert main.stdout.readline() == b"done\n"
        after = cpu.snapshot(probes)
        main.communicate()
    used = {name: after[name] - before[name] for name in after}
    # The child's 0.3 s is pool work: it must not read as the main process's own.
    assert used["pool children"] >= 0.25, used
    assert used["worker main"] < 0.15, used
