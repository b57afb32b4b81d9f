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

import os
import sys
from datetime import UTC, date, datetime, timedelta
from typing import Any

import streamlit as st

from pocoflow.db import WorkflowDB
from pocoflow.ledger.tables import RUN_STATUSES
from pocoflow.ui import actions, queries
from pocoflow.ui.queries import MonitorError, RunFilter
from pocoflow.ui.run_page import render_run_page
from pocoflow.ui.text import BADGES, duration, escape_md, short, short_times
from pocoflow.ui.widgets import go, ids, nav, open_run_picker, refresh_every

__all__ = ["render_workflow_monitor"]

PAGE_SIZE = 50


FILTER_KEYS = ("status", "flow", "since", "until", "q")


FLOWER_URL_ENV = "POCOFLOW_FLOWER_URL"


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
            render_run_page(ledger, url, run_id, allow_control)
        elif params.get("view") == "workers":
            nav("runs")
            _workers_page(ledger)
        else:
            nav("workers")
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
        return refresh_every("refresh-runs")


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
        go(page=str(chosen_page))
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
                "started": short(r["started_at"]),
                "duration": duration(r, now),
                "steps": r["total_steps"],
                "current node": r["current_node"],
                "error": r["error_msg"],
            }
            for r in page.rows
        ],
        hide_index=True,
    )
    open_run_picker(ids(page.rows), key="open-from-runs")


def _int(text: Any, default: int) -> int:
    try:
        return max(1, int(text))
    except (TypeError, ValueError):
        return default


def _bulk_controls(db: WorkflowDB, url: str, filt: RunFilter, allow_control: bool) -> None:
    """The same control on every run the filter selects: the count and the first runs
    are shown before the confirmation, and counted again when it is applied."""
    with st.expander("Act on every run this filter selects"):
        first = queries.runs_page(db, filt, limit=10)
        st.caption(escape_md(f"{first.total} runs, first: {', '.join(ids(first.rows))}"))
        action = st.selectbox("Action", actions.BULK_CHOICES, key="bulk-action")
        step = None
        what = f"{action} these {first.total} runs"
        if action == "fork":
            step = int(st.number_input("Fork each from step", -1, None, 0, key="bulk-step"))
            what = f"fork these {first.total} runs from step {step}"
            st.caption(
                "Each fork runs on the workers; a run without that step (or whose step was "
                "its last) is skipped and listed."
            )
        token = st.text_input("Control token", type="password", key="bulk-token")
        # The count the user confirmed is the one shown when the box was ticked: a click
        # on Apply draws the page again first, with whatever count the ledger has then.
        st.checkbox(
            f"Yes, {what}",
            key="bulk-confirm",
            on_change=_remember_selection,
            args=(db, filt),
        )
        # The click takes the tick (and clears the box): one tick, one bulk action.
        if not st.button("Apply to all", key="bulk-go", on_click=_take_bulk_tick):
            return
        count, fingerprint, confirmation = st.session_state.pop("bulk-applied", None) or (
            -1,
            "",
            None,
        )
        checks: dict[str, Any] = dict(
            db=db,
            db_url=url,
            allow_control=allow_control,
            token=token,
            expected=count,
            expected_selection=fingerprint,
        )
        try:
            if step is not None:
                # What the box was ticked for (the step its label named, once) is
                # compared in the action.
                _show_forks(actions.fork_runs(filt, step, confirmed=confirmation, **checks), step)
                return
            # What the box was ticked for (the action its label named, the runs the
            # filter selected); nothing remembered matches nothing.
            confirmed = confirmation is not None and confirmation.choice == action
            done, failed = actions.control_runs(action, filt, confirmed=confirmed, **checks)
        except Exception as exc:
            st.error(escape_md(f"{action} refused: {exc}"))
            return
        st.success(f"{action} requested for {len(done)} runs")
        for run_id, error in failed.items():
            st.error(escape_md(f"{run_id}: {error}"))


def _show_forks(forks: actions.Forks, step: int) -> None:
    if forks.forked:
        st.success(f"forked {len(forks.forked)} runs from step {step}")
        rows = [{"run id": parent, "fork": fork} for parent, fork in forks.forked.items()]
        st.dataframe(rows, hide_index=True, key="bulk-forks")
    else:
        st.error(f"no run was forked from step {step}")
    if forks.unsent:
        st.warning(escape_md(actions.unsent_warning(forks.unsent)))
    if forks.skipped:
        st.warning(f"skipped {len(forks.skipped)} runs with no step {step} to fork from")
        rows = [{"run id": run_id, "skipped": why} for run_id, why in forks.skipped.items()]
        st.dataframe(rows, hide_index=True, key="bulk-skipped")
    for run_id, error in forks.failed.items():
        st.error(escape_md(f"{run_id}: {error}"))


def _remember_selection(db: WorkflowDB, filt: RunFilter) -> None:
    """When the box is ticked: the count and the run ids it was ticked for, so Apply acts
    only if the filter still selects exactly those runs (not the same count of others,
    not another filter's runs after the filter was changed with the box still ticked),
    and a confirmation of the action chosen then (for a fork, its step), good once."""
    state = st.session_state
    if not state.get("bulk-confirm"):
        state["bulk-confirmed"] = None
        return
    choice = actions.confirmed_choice(state.get("bulk-action"), state.get("bulk-step"))
    state["bulk-confirmed"] = (*actions.selection(db, filt), actions.confirm(choice or ""))


def _take_bulk_tick() -> None:
    """On Apply, before the page is drawn again: the tick goes to the action and the box
    is cleared, so the next Apply needs a new tick (and a fresh count)."""
    state = st.session_state
    state["bulk-applied"] = state.pop("bulk-confirmed", None) if state.get("bulk-confirm") else None
    state["bulk-confirm"] = False


# ── workers and stuck runs ───────────────────────────────────────────────────


def _workers_page(db: WorkflowDB) -> None:
    st.subheader("Workers seen in the ledger")
    flower = os.environ.get(FLOWER_URL_ENV)
    if flower:
        st.link_button("Open Flower", flower)
    dead_after = st.number_input("Stale after (s)", 1, 3600, 30, key="stale-after")
    workers = queries.workers_seen(db, float(dead_after))
    if workers:
        st.dataframe(short_times(workers, "started", "last_seen"), hide_index=True)
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
    st.dataframe(short_times(stuck, "started_at", "last_commit"), hide_index=True)
    open_run_picker(ids(stuck), key="open-from-stuck")


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
