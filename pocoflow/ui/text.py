"""Ledger values as the monitor shows them: badges, short times, durations, previews,
and Markdown escaping. Pure functions (no Streamlit), so they are tested on their own."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

BADGES = {
    "queued": "⚪",
    "running": "🔵",
    "paused": "🟡",
    "waiting": "🟣",
    "completed": "🟢",
    "failed": "🔴",
    "cancelled": "⚫",
}


_MD_SPECIAL = set("\\`*_{}[]()#+-.!|<>~$=")


def escape_md(value: Any) -> str:
    """``value`` as text that Markdown shows literally (no link, image, HTML or format)."""
    return "".join("\\" + ch if ch in _MD_SPECIAL else ch for ch in str(value))


def short(iso: str | None) -> str | None:
    return None if not iso else iso.replace("T", " ")[:19]


def duration(run: dict[str, Any], now: datetime) -> str | None:
    try:
        start = datetime.fromisoformat(run["started_at"])
        end = (
            datetime.fromisoformat(run["completed_at"])
            if run.get("completed_at")
            else (now if run["status"] in ("queued", "running", "waiting") else None)
        )
    except (TypeError, ValueError):
        return None
    if end is None:
        return None
    seconds = max(0.0, (end - start).total_seconds())
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{sec:02d}s" if hours else f"{minutes}m{sec:02d}s"


def preview(value: Any, width: int = 200) -> str:
    text = json.dumps(value, default=repr, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 1] + "…"


def short_times(rows: list[dict[str, Any]], *columns: str) -> list[dict[str, Any]]:
    """``rows`` with the ISO times of ``columns`` shortened for a table (copies)."""
    return [{k: short(v) if k in columns else v for k, v in row.items()} for row in rows]
