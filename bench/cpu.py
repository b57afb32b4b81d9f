"""CPU time of the processes a load runs on, by part: what a step costs the whole box.

On a box whose cores the load saturates, throughput is cores / CPU per step, so the parts
say where a ratio to a reference is lost: the worker's main process (the Celery
consumer), its pool children (the task), PostgreSQL, Redis and the process that submits
and waits. Read from ``/proc`` (Linux): a process's own time, the time of the children
it reaped (PostgreSQL's finished backends, a pool's replaced children) and that of its
live descendants. Elsewhere every part reads 0 and the figure says so.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # fields from 3 (state) on


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _ticks_s(pid: int, first: int, end: int) -> float:
    fields = _stat(pid)
    if fields is None:
        return 0.0
    # utime, stime, cutime, cstime are fields 14-17 (1-based), 11-14 from field 3 on.
    return sum(int(v) for v in fields[first:end]) * _TICK_S


def self_s(pid: int) -> float:
    """User + system time of ``pid`` itself (its threads), not of any child."""
    return _ticks_s(pid, 11, 13)


def reaped_s(pid: int) -> float:
    """User + system time of the children ``pid`` reaped (and of theirs)."""
    return _ticks_s(pid, 13, 15)


def own_s(pid: int) -> float:
    """User + system time of ``pid`` and of the children it reaped."""
    return _ticks_s(pid, 11, 15)


def tree_s(pid: int) -> float:
    """``own_s`` of ``pid`` and of every live descendant."""
    return own_s(pid) + sum(tree_s(child) for child in _children(pid))


def parent(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[1]) if fields is not None else None


Probe = Callable[[], float]


def worker_probes(main_pids: Iterable[int]) -> dict[str, Probe]:
    """Celery worker nodes, their main processes apart from their pool children."""
    mains = list(main_pids)
    return {
        "worker main": lambda: sum(self_s(m) for m in mains),
        # A pool child the main process replaced (and reaped) stays pool work.
        "pool children": lambda: sum(
            reaped_s(m) + sum(tree_s(c) for c in _children(m)) for m in mains
        ),
    }


def server_probe(pid: int | None, program: str) -> Probe:
    """A server on this box: its root process ``pid`` and every process it started; 0
    when ``pid`` is None or is not ``program`` here (a server in a container or on
    another host reports a pid of its own namespace, which names another process)."""
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip() if pid is not None else ""
    except OSError:
        name = ""
    if pid is None or not name.startswith(program):
        return lambda: 0.0
    return lambda: tree_s(pid)


def snapshot(probes: Mapping[str, Probe]) -> dict[str, float]:
    return {name: probe() for name, probe in probes.items()}


def per_step_us(before: Mapping[str, float], after: Mapping[str, float], steps: int) -> str:
    """``part X us, ...; all Y us`` per step between two snapshots."""
    if not any(after.values()):
        return "no /proc here: not measured"
    used = {name: (after[name] - before.get(name, 0.0)) / steps * 1e6 for name in after}
    parts = ", ".join(f"{name} {us:.0f}" for name, us in used.items())
    return f"{parts}; all {sum(used.values()):.0f} us"
