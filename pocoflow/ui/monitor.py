"""The Streamlit monitor: watch (and, when allowed, steer) the runs of a PocoFlow ledger.

Three ways in, one page::

    pocoflow monitor --db sqlite:///pocoflow.db [--port 8501] [--allow-control]
    streamlit run pocoflow/ui/monitor.py -- pocoflow.db [--allow-control]

    from pocoflow.ui.monitor import render_workflow_monitor
    render_workflow_monitor("pocoflow.db")          # inside any Streamlit page

Every read is one bounded query from ``pocoflow.ui.queries`` (a page of rows or an
aggregate), so the page costs the same with 100 runs or 100,000. The view (filters, page,
open run) lives in the URL's query parameters, so a view can be shared by its link. A
problem with the ledger is said on the page, never shown as a traceback; values from the
ledger are shown as data (tables, code) or escaped before they reach Markdown.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import streamlit as st

from pocoflow.db import WorkflowDB
from pocoflow.ledger.tables import RUN_STATUSES
from pocoflow.ui import actions, queries
from pocoflow.ui.queries import MonitorError, RunFilter

__all__ = ["render_workflow_monitor"]

PAGE_SIZE = 50
EVENT_PAGE = 100
LIVE_EVENTS_KEPT = 50
REFRESH = {"off": None, "5 s": 5, "10 s": 10, "30 s": 30}
BADGES = {
    "queued": "⚪",
    "running": "🔵",
    "paused": "🟡",
    "waiting": "🟣",
    "completed": "🟢",
    "failed": "🔴",
    "cancelled": "⚫",
}
FILTER_KEYS = ("status", "flow", "since", "until", "q")
FLOWER_URL_ENV = "POCOFLOW_FLOWER_URL"
_MD_SPECIAL = set("\\`*_{}[]()#+-.!|<>~$=")


def escape_md(value: Any) -> str:
    """``value`` as text that Markdown shows literally (no link, image, HTML or format)."""
    return "".join("\\" + ch if ch in _MD_SPECIAL else ch for ch in str(value))


def render_workflow_monitor(
    db: str | os.PathLike[str] | WorkflowDB, *, allow_control: bool = False
) -> None:
    """Render the monitor for the ledger ``db`` (a SQLite path, a URL or a ``WorkflowDB``)
    in the current Streamlit page.

    ``allow_control`` offers cancel / pause / resume / send on a run's page; each also
    needs the token of ``POCOFLOW_MONITOR_TOKEN`` typed into the page and a confirmation,
    checked where the action runs (``pocoflow.ui.actions``).
    """
    try:
        ledger = queries.open_ledger(db)
    except MonitorError as exc:
        st.error(escape_md(exc))
        return
    url = _raw_url(db, ledger)
    st.title("PocoFlow monitor")
    st.caption(escape_md(f"Ledger: {ledger._ledger.label}"))
    params = st.query_params
    try:
        run_id = params.get("run")
        if run_id:
            _run_page(ledger, url, run_id, allow_control)
        elif params.get("view") == "workers":
            _nav("runs")
            _workers_page(ledger)
        else:
            _nav("workers")
            _runs_page(ledger, url, allow_control)
    except Exception as exc:  # say it on the page; Streamlit's own control flow passes
        if type(exc).__module__.startswith("streamlit"):
            raise
        st.error(escape_md(f"Reading the ledger {ledger.url} failed: {type(exc).__name__}: {exc}"))


def _raw_url(db: Any, ledger: WorkflowDB) -> str:
    """The URL controls reopen the ledger with: the caller's own text (``ledger.url`` has
    its password masked)."""
    if isinstance(db, WorkflowDB):
        return db._ledger.url.render_as_string(hide_password=False)
    return os.fspath(db)


def _nav(target: str) -> None:
    label = {"runs": "← All runs", "workers": "Workers and stuck runs →"}[target]
    if st.button(label, key=f"nav-{target}"):
        _go(view=None if target == "runs" else "workers", run=None)


def _go(**changes: str | None) -> None:
    """Change the URL's query parameters and render again."""
    for key, value in changes.items():
        if value is None:
            if key in st.query_params:
                del st.query_params[key]
        else:
            st.query_params[key] = value
    st.rerun()


def _refresh_every(key: str) -> int | None:
    choice = st.selectbox("Auto-refresh", list(REFRESH), key=key)
    return REFRESH[choice]


# ── runs ─────────────────────────────────────────────────────────────────────


@st.cache_data(ttl=60, show_spinner=False)
def _flow_names(url: str, _db: WorkflowDB) -> list[str]:
    return queries.flow_names(_db)


def _runs_page(db: WorkflowDB, url: str, allow_control: bool) -> None:
    current = RunFilter.from_params(st.query_params)
    cols = st.columns([2, 2, 1, 1, 2, 1])
    statuses = cols[0].multiselect("Status", RUN_STATUSES, default=list(current.statuses))
    names = sorted(set(_flow_names(db.url, db)) | set(current.flows))
    flows = cols[1].multiselect("Flow", names, default=list(current.flows))
    since = cols[2].date_input("Since", value=_day(current.since), key="since")
    until = cols[3].date_input("Until (incl.)", value=_until_day(current.until), key="until")
    text = cols[4].text_input("Run id or error contains", value=current.text)
    every = _refresh_every_in(cols[5])
    chosen = RunFilter(
        tuple(statuses),
        tuple(flows),
        since.isoformat() if isinstance(since, date) else None,
        (until + timedelta(days=1)).isoformat() if isinstance(until, date) else None,
        text.strip(),
    )
    chosen = RunFilter.from_params(chosen.to_params())  # same normal form as the URL's
    if chosen != current:
        for key in FILTER_KEYS:
            st.query_params.pop(key, None)
        st.query_params.update(chosen.to_params())
        st.query_params.pop("page", None)
        st.session_state.pop("runs-page", None)  # a new filter starts on its first page
    st.fragment(run_every=every)(_runs_table)(db, chosen)
    if allow_control:
        _bulk_controls(db, url, chosen, allow_control)


def _refresh_every_in(container: Any) -> int | None:
    with container:
        return _refresh_every("refresh-runs")


def _day(iso: str | None) -> date | None:
    return datetime.fromisoformat(iso).date() if iso else None


def _until_day(iso: str | None) -> date | None:
    return None if iso is None else datetime.fromisoformat(iso).date() - timedelta(days=1)


def _runs_table(db: WorkflowDB, filt: RunFilter) -> None:
    page_no = _int(st.query_params.get("page"), 1)
    page = queries.runs_page(db, filt, limit=PAGE_SIZE, offset=(page_no - 1) * PAGE_SIZE)
    pages = max(1, -(-page.total // PAGE_SIZE))
    left, right = st.columns([3, 1])
    left.caption(f"{page.total} runs · page {min(page_no, pages)} of {pages}")
    chosen_page = right.number_input("Page", 1, pages, min(page_no, pages), key="runs-page")
    if chosen_page != page_no:
        _go(page=str(chosen_page))
    if not page.rows:
        st.info(
            "No runs match these filters." if page.total or filt != RunFilter() else "No runs yet."
        )
        return
    now = datetime.now(UTC)
    st.dataframe(
        [
            {
                "run id": r["run_id"],
                "flow": r["flow_name"],
                "status": f"{BADGES.get(r['status'], '')} {r['status']}",
                "started": _short(r["started_at"]),
                "duration": _duration(r, now),
                "steps": r["total_steps"],
                "current node": r["current_node"],
                "error": r["error_msg"],
            }
            for r in page.rows
        ],
        hide_index=True,
        width="stretch",
    )
    _open_run_picker(ids(page.rows), key="open-from-runs")


def _open_run_picker(run_ids: list[str], *, key: str) -> None:
    left, right = st.columns([4, 1])
    picked = left.selectbox("Run", run_ids, key=key, label_visibility="collapsed")
    if right.button("Open run", key=f"{key}-go") and picked:
        _go(run=picked)


def _int(text: Any, default: int) -> int:
    try:
        return max(1, int(text))
    except (TypeError, ValueError):
        return default


def _short(iso: str | None) -> str | None:
    return None if not iso else iso.replace("T", " ")[:19]


def _duration(run: dict[str, Any], now: datetime) -> str | None:
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


def _bulk_controls(db: WorkflowDB, url: str, filt: RunFilter, allow_control: bool) -> None:
    """The same control on every run the filter selects: the count and the first runs
    are shown before the confirmation, and counted again when it is applied."""
    with st.expander("Act on every run this filter selects"):
        first = queries.runs_page(db, filt, limit=10)
        st.caption(escape_md(f"{first.total} runs, first: {', '.join(ids(first.rows))}"))
        action = st.selectbox("Action", actions.BULK_ACTIONS, key="bulk-action")
        token = st.text_input("Control token", type="password", key="bulk-token")
        # The count the user confirmed is the one shown when the box was ticked: a click
        # on Apply draws the page again first, with whatever count the ledger has then.
        confirmed = st.checkbox(
            f"Yes, {action} these {first.total} runs",
            key="bulk-confirm",
            on_change=_remember_count,
            args=(first.total,),
        )
        if not st.button("Apply to all", key="bulk-go"):
            return
        try:
            done, failed = actions.control_runs(
                action,
                filt,
                db=db,
                db_url=url,
                allow_control=allow_control,
                token=token,
                confirmed=confirmed,
                expected=st.session_state.get("bulk-confirmed-count", first.total),
            )
        except Exception as exc:
            st.error(escape_md(f"{action} refused: {exc}"))
            return
        st.success(f"{action} requested for {len(done)} runs")
        for run_id, error in failed.items():
            st.error(escape_md(f"{run_id}: {error}"))


def _remember_count(count: int) -> None:
    st.session_state["bulk-confirmed-count"] = count


def ids(rows: list[dict[str, Any]]) -> list[str]:
    return [r["run_id"] for r in rows]


# ── workers and stuck runs ───────────────────────────────────────────────────


def _workers_page(db: WorkflowDB) -> None:
    st.subheader("Workers seen in the ledger")
    flower = os.environ.get(FLOWER_URL_ENV)
    if flower:
        st.link_button("Open Flower", flower)
    dead_after = st.number_input("Stale after (s)", 1, 3600, 30, key="stale-after")
    workers = queries.workers_seen(db, float(dead_after))
    if workers:
        st.dataframe(workers, hide_index=True, width="stretch")
    else:
        st.info("No worker has written to this ledger (in-process runs need none).")
    st.subheader("Stuck runs")
    threshold = st.number_input(
        "Running, nothing committed for (s)", 1, 7 * 86400, 300, key="stuck-after"
    )
    stuck = queries.stuck_runs(db, float(threshold))
    if not stuck:
        st.success("No stuck runs.")
        return
    st.dataframe(stuck, hide_index=True, width="stretch")
    _open_run_picker(ids(stuck), key="open-from-stuck")


# ── one run ──────────────────────────────────────────────────────────────────


def _run_page(db: WorkflowDB, url: str, run_id: str, allow_control: bool) -> None:
    _nav("runs")
    run = db.get_run(run_id)
    if run is None:
        st.error(escape_md(f"Unknown run id {run_id!r} in ledger {db.url}"))
        return
    title, refresh = st.columns([5, 1])
    title.subheader(f"Run {escape_md(run_id)}")
    with refresh:
        every = _refresh_every(f"refresh-{run_id}")
    st.fragment(run_every=every)(_run_header)(db, run_id)
    sections: list[tuple[str, Callable[[], None]]] = [
        ("Timeline", lambda: _timeline(db, run_id)),
        ("Attempts", lambda: _attempts(db, run_id)),
        ("Store", lambda: _store(db, run_id)),
        ("Diff", lambda: _diff(db, run)),
        ("Usage", lambda: _usage(db, run_id)),
        ("Graph", lambda: _graph(db, run)),
        ("Resume", lambda: _resume(run, url)),
    ]
    if allow_control:
        sections.append(("Controls", lambda: _controls(run_id, url, allow_control)))
    for tab, (_, draw) in zip(st.tabs([name for name, _ in sections]), sections, strict=True):
        with tab:
            draw()


def _run_header(db: WorkflowDB, run_id: str) -> None:
    """The run's row and the events that arrived since the page opened: a live tick reads
    one run row and the events after the last one it saw, nothing else."""
    run = db.get_run(run_id) or {}
    status = run.get("status", "?")
    cols = st.columns(5)
    cols[0].metric("Status", f"{BADGES.get(status, '')} {status}")
    cols[1].metric("Flow", run.get("flow_name") or "-")
    cols[2].metric("Steps", run.get("total_steps") or 0)
    cols[3].metric("Current node", run.get("current_node") or "-")
    cols[4].metric("Duration", _duration(run, datetime.now(UTC)) or "-")
    st.caption(f"Started {_short(run.get('started_at'))}")
    if run.get("error_msg"):
        st.code(run["error_msg"], language=None)
    key = f"live-{run_id}"
    seen = st.session_state.get(key)
    if seen is None:
        seen = {"last_id": queries.last_event_id(db, run_id), "rows": []}
    new = queries.events_after(db, run_id, seen["last_id"])
    if new:
        seen = {"last_id": new[-1]["id"], "rows": (seen["rows"] + new)[-LIVE_EVENTS_KEPT:]}
    st.session_state[key] = seen
    if seen["rows"]:
        st.caption(f"{len(seen['rows'])} new events since this page opened")
        st.dataframe(seen["rows"], hide_index=True, width="stretch")


def _paged(label: str, total: int, size: int, key: str) -> int:
    pages = max(1, -(-total // size))
    page = st.number_input(f"{label} page (of {pages})", 1, pages, 1, key=key)
    return (int(page) - 1) * size


def _timeline(db: WorkflowDB, run_id: str) -> None:
    failures = st.checkbox("Failures only", key=f"failures-{run_id}")
    offset_key = f"events-page-{run_id}-{failures}"
    offset = (int(st.session_state.get(offset_key, 1)) - 1) * EVENT_PAGE
    page = queries.events_page(db, run_id, failures_only=failures, limit=EVENT_PAGE, offset=offset)
    _paged("Events", page.total, EVENT_PAGE, offset_key)
    st.caption(f"{page.total} events" + (" with a failure" if failures else ""))
    if page.rows:
        st.dataframe(page.rows, hide_index=True, width="stretch")
    else:
        st.info("No failures." if failures else "No events recorded for this run.")


def _attempts(db: WorkflowDB, run_id: str) -> None:
    key = f"attempts-page-{run_id}"
    offset = (int(st.session_state.get(key, 1)) - 1) * EVENT_PAGE
    page = queries.attempts_page(db, run_id, limit=EVENT_PAGE, offset=offset)
    _paged("Attempts", page.total, EVENT_PAGE, key)
    if page.rows:
        bars = gantt_bars(page.rows, datetime.now(UTC))
    else:
        st.info("No attempts: a run in a process records none; steps on workers do.")
        events = queries.events_page(db, run_id, limit=EVENT_PAGE, offset=offset).rows
        bars = gantt_from_events(events)
    if bars:
        st.caption("Gantt of the steps on this page (colour: worker)")
        st.vega_lite_chart(bars, GANTT_SPEC, width="stretch")
    if page.rows:
        st.dataframe(page.rows, hide_index=True, width="stretch")


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


def _step_slider(label: str, bounds: tuple[int, int, int], value: int, key: str) -> int:
    low, high, _ = bounds
    if low == high:
        st.caption(f"{label}: {low}")
        return low
    return int(st.slider(label, low, high, value, key=key))


def _store(db: WorkflowDB, run_id: str) -> None:
    bounds = queries.checkpoint_range(db, run_id)
    if bounds is None:
        st.info("No checkpoint yet.")
        return
    step = _step_slider("Step (-1 = the initial Store)", bounds, bounds[1], f"store-{run_id}")
    try:
        data = db.load_checkpoint(run_id, step).as_dict()
    except KeyError:
        st.warning(escape_md(f"No checkpoint for step {step} of run {run_id!r}"))
        return
    node = queries.checkpoint_node(db, run_id, step)
    st.caption(
        escape_md(f"After step {step}" + (f" ({node})" if node else "") + f": {len(data)} keys")
    )
    st.dataframe(
        [{"key": k, "value": _preview(v)} for k, v in data.items()],
        hide_index=True,
        width="stretch",
    )
    with st.expander("Raw JSON"):
        st.json(data)


def _preview(value: Any, width: int = 200) -> str:
    text = json.dumps(value, default=repr, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 1] + "…"


def _diff(db: WorkflowDB, run: dict[str, Any]) -> None:
    run_id = run["run_id"]
    bounds = queries.checkpoint_range(db, run_id)
    if bounds is None:
        st.info("No checkpoint yet.")
        return
    low, high, _ = bounds
    parent = run.get("parent_run_id")
    against = "this run"
    if parent:
        against = st.radio(
            "Compare with", ["this run", escape_md(f"parent {parent}")], key=f"diff-src-{run_id}"
        )
    left, right = st.columns(2)
    with right:
        after = _step_slider("To step", bounds, high, f"diff-to-{run_id}")
    if against == "this run":
        with left:
            before = _step_slider("From step", bounds, max(low, after - 1), f"diff-from-{run_id}")
        old = db.load_checkpoint(run_id, before).as_dict()
        title = f"step {before} -> step {after}"
    else:
        step = run.get("forked_from_step")
        step = -1 if step is None else int(step)
        try:
            old = db.load_checkpoint(str(parent), step).as_dict()
        except KeyError:
            st.warning(escape_md(f"Parent run {parent!r} has no checkpoint {step} any more"))
            return
        title = f"parent {parent} at step {step} -> this run at step {after}"
    new = db.load_checkpoint(run_id, after).as_dict()
    rows = queries.diff_stores(old, new)
    st.caption(escape_md(f"{title}: {len(rows)} keys differ"))
    if rows:
        st.dataframe(
            [
                {
                    "key": r.key,
                    "change": r.change,
                    "before": _preview(r.before),
                    "after": _preview(r.after),
                }
                for r in rows
            ],
            hide_index=True,
            width="stretch",
        )


def _usage(db: WorkflowDB, run_id: str) -> None:
    total = db.get_usage(run_id)
    cols = st.columns(4)
    cols[0].metric("Calls", total["calls"])
    cols[1].metric("Input tokens", total["input_tokens"])
    cols[2].metric("Output tokens", total["output_tokens"])
    cols[3].metric("Cost (USD)", f"{total['cost_usd']:.4f}")
    rows = queries.usage_by_node_model(db, run_id)
    if rows:
        st.dataframe(rows, hide_index=True, width="stretch")
    else:
        st.info("No usage reported (nodes call report_usage inside exec).")


def graph_dot(
    shape: dict[str, Any], current: str | None, items: dict[str, dict[str, int]] | None = None
) -> str:
    """Graphviz DOT of a run's graph shape, the current node filled, fan-out counts shown."""

    def q(text: Any) -> str:
        return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [
        "digraph flow {",
        "  rankdir=LR;",
        '  node [shape=box, style="rounded,filled", fillcolor="white"];',
    ]
    for node_id, entry in (shape.get("nodes") or {}).items():
        label = node_id
        counts = (items or {}).get(node_id)
        if counts:
            label += "\n" + " / ".join(
                f"{counts.get(s, 0)} {s}" for s in ("done", "failed", "running")
            )
        fill = "#ffd54f" if node_id == current else "white"
        lines.append(f"  {q(node_id)} [label={q(label)}, fillcolor={q(fill)}];")
        for action, target in (entry.get("edges") or {}).items():
            lines.append(f"  {q(node_id)} -> {q(target)} [label={q(action)}];")
    lines.append("}")
    return "\n".join(lines)


def _graph(db: WorkflowDB, run: dict[str, Any]) -> None:
    text = run.get("graph_shape")
    items = queries.item_counts(db, run["run_id"])
    if not text:
        st.info("This run recorded no graph shape (runs submitted to workers do).")
    else:
        try:
            shape = json.loads(text)
        except ValueError:
            st.warning("The run's graph shape is not valid JSON.")
        else:
            st.graphviz_chart(graph_dot(shape, run.get("current_node"), items))
    if items:
        st.caption("Map items by node and status")
        st.dataframe(
            [{"node": node, **counts} for node, counts in items.items()],
            hide_index=True,
        )


def _resume(run: dict[str, Any], url: str) -> None:
    from pocoflow.settings import mask_url

    run_id, shown = run["run_id"], mask_url(url)
    st.caption("Resume (a paused, failed or cancelled run goes on from its last checkpoint):")
    st.code(
        "from pocoflow import attach\n\n"
        f"handle = attach({run_id!r}, db_url={shown!r})\n"
        "handle.resume()\n"
        "print(handle.wait())",
        language="python",
    )
    st.caption("Or from a shell (a run started in a process also needs --flow MODULE:BUILDER):")
    st.code(f"pocoflow resume {_sh(run_id)} --db {_sh(shown)}", language="bash")
    st.caption("Fork from a step:")
    st.code(f"pocoflow fork {_sh(run_id)} --from-step N --db {_sh(shown)}", language="bash")


def _sh(text: str) -> str:
    import shlex

    return shlex.quote(text)


def _controls(run_id: str, url: str, allow_control: bool) -> None:
    if not actions.controls_enabled(allow_control):
        st.warning(f"Controls need a token: set {actions.TOKEN_ENV} where the monitor runs.")
    action = st.selectbox("Action", actions.ACTIONS, key=f"ctl-action-{run_id}")
    key = value = None
    if action == "send":
        key = st.text_input("Key", key=f"ctl-key-{run_id}")
        value = st.text_area("Value (JSON)", "true", key=f"ctl-value-{run_id}")
    token = st.text_input("Control token", type="password", key=f"ctl-token-{run_id}")
    confirmed = st.checkbox(escape_md(f"Yes, {action} run {run_id}"), key=f"ctl-confirm-{run_id}")
    if st.button("Apply", key=f"ctl-go-{run_id}"):
        try:
            done = actions.control_run(
                action,
                run_id,
                db_url=url,
                allow_control=allow_control,
                token=token,
                confirmed=confirmed,
                key=key,
                value_json=value,
            )
        except Exception as exc:  # refused, unknown run, bad JSON, broker down: say it
            st.error(escape_md(f"{action} refused: {exc}"))
        else:
            st.success(escape_md(done))


# ── streamlit run pocoflow/ui/monitor.py -- DB [--allow-control] ─────────────


def main(argv: list[str]) -> None:
    """The script's entry: ``DB`` from the arguments, else ``POCOFLOW_DB_URL``."""
    from pocoflow.settings import DEFAULT_DB_URL

    allow = "--allow-control" in argv
    rest = [a for a in argv if a != "--allow-control"]
    location = rest[0] if rest else os.environ.get("POCOFLOW_DB_URL", DEFAULT_DB_URL)
    st.set_page_config(page_title="PocoFlow monitor", layout="wide")
    render_workflow_monitor(location, allow_control=allow)


if __name__ == "__main__":
    main(sys.argv[1:])
