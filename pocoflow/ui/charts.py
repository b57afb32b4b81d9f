"""The monitor's charts as data: the flow graph as Graphviz DOT and the Gantt bars of a
run's steps and attempts (a Vega-Lite spec). Pure functions (no Streamlit)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

GANTT_SPEC: dict[str, Any] = {
    "mark": {"type": "bar", "tooltip": True},
    "encoding": {
        "y": {"field": "step", "type": "ordinal", "sort": None, "title": "step / attempt"},
        "x": {"field": "start", "type": "temporal", "title": None},
        "x2": {"field": "end"},
        "color": {"field": "worker", "type": "nominal"},
        "opacity": {
            "condition": {"test": "datum.outcome == 'committed'", "value": 1},
            "value": 0.5,
        },
    },
}


def gantt_bars(attempts: list[dict[str, Any]], now: datetime) -> list[dict[str, Any]]:
    """One bar per attempt (step and attempt, worker, outcome, start, end); an attempt
    still running ends ``now``."""
    return [
        {
            "step": f"{a['step']} #{a['attempt']}",
            "worker": a["worker"] or "?",
            "outcome": a["outcome"] or "running",
            "start": a["started"],
            "end": a["ended"] or now.isoformat(),
        }
        for a in attempts
        if a.get("started")
    ]


def gantt_from_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Bars of a run in a process (no attempts): each ``node_end`` event ends its step,
    which began ``elapsed_ms`` before."""
    out = []
    for e in events:
        if e["event"] != "node_end" or e["elapsed_ms"] is None or e["step"] is None:
            continue
        try:
            end = datetime.fromisoformat(e["ts"])
        except (TypeError, ValueError):
            continue
        start = end - timedelta(milliseconds=float(e["elapsed_ms"]))
        out.append(
            {
                "step": f"{e['step']} {e['node_name']}",
                "worker": "in process",
                "outcome": "committed",
                "start": start.isoformat(),
                "end": end.isoformat(),
            }
        )
    return out


def graph_dot(
    shape: dict[str, Any], current: str | None, items: dict[str, dict[str, int]] | None = None
) -> str:
    """Graphviz DOT of a run's graph shape, the current node filled, fan-out counts shown."""

    def q(text: Any) -> str:
        # DOT string: backslash and quote escaped, a line break as DOT's own \n.
        escaped = str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return '"' + escaped + '"'

    lines = [
        "digraph flow {",
        "  rankdir=LR;",
        '  node [shape=box, style="rounded,filled", fillcolor="white"];',
    ]
    for node_id, entry in (shape.get("nodes") or {}).items():
        label = node_id
        counts = (items or {}).get(node_id)
        if counts:
            label += "\n" + " / ".join(f"{n} {status}" for status, n in _ordered(counts))
        fill = "#ffd54f" if node_id == current else "white"
        lines.append(f"  {q(node_id)} [label={q(label)}, fillcolor={q(fill)}];")
        for action, target in (entry.get("edges") or {}).items():
            lines.append(f"  {q(node_id)} -> {q(target)} [label={q(action)}];")
    lines.append("}")
    return "\n".join(lines)


ITEM_ORDER = ("done", "failed", "running", "queued")


def _ordered(counts: dict[str, int]) -> list[tuple[str, int]]:
    """Item counts in reading order: done, failed, running, queued, then any other."""
    rank = {status: i for i, status in enumerate(ITEM_ORDER)}
    return sorted(counts.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0]))
