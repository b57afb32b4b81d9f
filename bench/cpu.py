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


def own_s(pid: int) -> float:
    """User + system time of ``pid`` and of the children it reaped."""
    fields = _stat(pid)
    if fields is None:
        return 0.0
    # utime, stime, cutime, cstime are fields 14-17 (1-based), 11-14 from field 3 on.
    return sum(int(v) for v in fields[11:15]) * _TICK_S


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
        "worker main": lambda: sum(own_s(m) for m in mains),
        "pool children": lambda: sum(tree_s(c) for m in mains for c in _children(m)),
    }


def server_probe(pid: int | None) -> Probe:
    """A server on this box (its root process and every process it started); 0 for one
    that is not (``pid`` None)."""
    return (lambda: 0.0) if pid is None else (lambda: tree_s(pid))


def snapshot(probes: Mapping[str, Probe]) -> dict[str, float]:
    return {name: probe() for name, probe in probes.items()}


def per_step_us(before: Mapping[str, float], after: Mapping[str, float], steps: int) -> str:
    """``part X us, ...; all Y us`` per step between two snapshots."""
    if not any(after.values()):
        return "no /proc here: not measured"
    used = {name: (after[name] - before.get(name, 0.0)) / steps * 1e6 for name in after}
    parts = ", ".join(f"{name} {us:.0f}" for name, us in used.items())
    return f"{parts}; all {sum(used.values()):.0f} us"
