"""One run's page: its live header, then tabs for the timeline, attempts (and their
Gantt chart), the store inspector, checkpoint diffs, usage, graph, resume snippet and,
when allowed, controls. Each tab reads one page or one aggregate of the ledger."""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import streamlit as st

from pocoflow.db import WorkflowDB
from pocoflow.ui import actions, queries
from pocoflow.ui.charts import GANTT_SPEC, gantt_bars, gantt_from_events, graph_dot
from pocoflow.ui.text import BADGES, duration, escape_md, preview, short, short_times
from pocoflow.ui.widgets import go, nav, page_offset, paged, refresh_every, step_slider

EVENT_PAGE = 100
LIVE_EVENTS_KEPT = 50


def render_run_page(db: WorkflowDB, url: str, run_id: str, allow_control: bool) -> None:
    nav("runs")
    run = db.get_run(run_id)
    if run is None:
        st.error(escape_md(f"Unknown run id {run_id!r} in ledger {db.url}"))
        return
    title, refresh = st.columns([5, 1])
    title.subheader(f"Run {escape_md(run_id)}")
    with refresh:
        every = refresh_every(f"refresh-{run_id}")
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
        sections.append(("Controls", lambda: _controls(db, run_id, url, allow_control)))
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
    # st.metric renders its value as Markdown: names from the ledger are escaped.
    cols[1].metric("Flow", escape_md(run.get("flow_name") or "-"))
    cols[2].metric("Steps", run.get("total_steps") or 0)
    cols[3].metric("Current node", escape_md(run.get("current_node") or "-"))
    cols[4].metric("Duration", duration(run, datetime.now(UTC)) or "-")
    st.caption(f"Started {short(run.get('started_at'))}")
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
        st.dataframe(seen["rows"], hide_index=True)


def _timeline(db: WorkflowDB, run_id: str) -> None:
    failures = st.checkbox("Failures only", key=f"failures-{run_id}")
    offset_key = f"events-page-{run_id}-{failures}"
    offset = page_offset(offset_key, EVENT_PAGE)
    page = queries.events_page(db, run_id, failures_only=failures, limit=EVENT_PAGE, offset=offset)
    paged("Events", page.total, EVENT_PAGE, offset_key)
    st.caption(f"{page.total} events" + (" with a failure" if failures else ""))
    if page.rows:
        st.dataframe(short_times(page.rows, "ts"), hide_index=True)
    else:
        st.info("No failures." if failures else "No events recorded for this run.")


def _attempts(db: WorkflowDB, run_id: str) -> None:
    key = f"attempts-page-{run_id}"
    offset = page_offset(key, EVENT_PAGE)
    page = queries.attempts_page(db, run_id, limit=EVENT_PAGE, offset=offset)
    paged("Attempts", page.total, EVENT_PAGE, key)
    if page.rows:
        bars = gantt_bars(page.rows, datetime.now(UTC))
    else:
        st.info("No attempts: a run in a process records none; steps on workers do.")
        events = queries.events_page(db, run_id, limit=EVENT_PAGE, offset=offset).rows
        bars = gantt_from_events(events)
    if bars:
        st.caption("Gantt of the steps on this page (colour: worker)")
        st.vega_lite_chart(bars, GANTT_SPEC)
    if page.rows:
        st.dataframe(short_times(page.rows, "started", "ended"), hide_index=True)


def _store(db: WorkflowDB, run_id: str) -> None:
    bounds = queries.checkpoint_range(db, run_id)
    if bounds is None:
        st.info("No checkpoint yet.")
        return
    step = step_slider("Step (-1 = the initial Store)", bounds, bounds[1], f"store-{run_id}")
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
        [{"key": k, "value": preview(v)} for k, v in data.items()],
        hide_index=True,
    )
    with st.expander("Raw JSON"):
        st.json(data)


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
        after = step_slider("To step", bounds, high, f"diff-to-{run_id}")
    if against == "this run":
        with left:
            before = step_slider("From step", bounds, max(low, after - 1), f"diff-from-{run_id}")
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
                    "before": preview(r.before),
                    "after": preview(r.after),
                }
                for r in rows
            ],
            hide_index=True,
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
        st.dataframe(rows, hide_index=True)
    else:
        st.info("No usage reported (nodes call report_usage inside exec).")


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
    st.code(f"pocoflow resume {shlex.quote(run_id)} --db {shlex.quote(shown)}", language="bash")
    st.caption("Fork from a step:")
    st.code(
        f"pocoflow fork {shlex.quote(run_id)} --from-step N --db {shlex.quote(shown)}",
        language="bash",
    )


def _controls(db: WorkflowDB, run_id: str, url: str, allow_control: bool) -> None:
    if not actions.controls_enabled(allow_control):
        st.warning(f"Controls need a token: set {actions.TOKEN_ENV} where the monitor runs.")
    action = st.selectbox("Action", actions.ACTIONS, key=f"ctl-action-{run_id}")
    key = value = None
    step: int | None = None
    if action == "send":
        key = st.text_input("Key", key=f"ctl-key-{run_id}")
        value = st.text_area("Value (JSON)", "true", key=f"ctl-value-{run_id}")
    if action == "fork":
        step = _fork_step(db, run_id)
        if step is None:
            return
    token = st.text_input("Control token", type="password", key=f"ctl-token-{run_id}")
    ticked_for = f"ctl-confirmed-for-{run_id}"
    box = f"ctl-confirm-{run_id}"
    what = f"fork run {run_id} from step {step}" if action == "fork" else f"{action} run {run_id}"
    st.checkbox(
        escape_md(f"Yes, {what}"),
        key=box,
        on_change=_remember,
        args=(run_id, box, ticked_for),
    )
    forked_key = f"ctl-forked-{run_id}"
    applied = f"ctl-applied-{run_id}"
    # The click takes the tick (and clears the box): one tick, one action.
    if st.button(
        "Apply", key=f"ctl-go-{run_id}", on_click=_take_tick, args=(box, ticked_for, applied)
    ):
        # What the box was ticked for, the action compares: a tick confirms only the
        # action (and fork step) its label named then, and a fork's tick only once.
        confirmation = st.session_state.pop(applied, None)
        try:
            if action == "fork":
                assert step is not None
                forked = actions.fork_from(
                    run_id,
                    step,
                    db_url=url,
                    allow_control=allow_control,
                    token=token,
                    confirmed=confirmation,
                )
                st.session_state[forked_key] = (step, forked.run_id)
                done = f"run {run_id}: forked from step {step} as {forked.run_id}"
                if not forked.sent:
                    st.warning(escape_md(actions.unsent_warning([forked.run_id])))
            else:
                done = actions.control_run(
                    action,
                    run_id,
                    db_url=url,
                    allow_control=allow_control,
                    token=token,
                    confirmed=confirmation is not None and confirmation.choice == action,
                    key=key,
                    value_json=value,
                )
        except Exception as exc:  # refused, unknown run, bad JSON, broker down: say it
            st.error(escape_md(f"{action} refused: {exc}"))
        else:
            st.success(escape_md(done))
    if forked_key in st.session_state:
        _fork_link(*st.session_state[forked_key])


def _fork_step(db: WorkflowDB, run_id: str) -> int | None:
    """The checkpoint to fork from: the Store tab's step if one was picked there before
    the latest, else the one before the latest; None (said on the page) when the run has
    no checkpoint yet."""
    bounds = queries.checkpoint_range(db, run_id)
    if bounds is None:
        st.info("No checkpoint yet: nothing to fork from.")
        return None
    low, high, _ = bounds
    # The Store tab's step, but not the latest: a run that ended there has nothing after it.
    picked = min(st.session_state.get(f"store-{run_id}", high), high - 1)
    st.caption("The fork runs on the workers, from the node that step recorded as next.")
    return int(
        st.number_input("Fork from step", low, high, max(low, picked), key=f"ctl-step-{run_id}")
    )


def _fork_link(step: int, new_run_id: str) -> None:
    """The last fork made from this page, with a way to its page (kept across reruns, so
    the button still works after the click that made the fork)."""
    st.markdown(
        escape_md(f"Fork from step {step}: ")
        + f"[{escape_md(new_run_id)}](?run={quote(new_run_id, safe='')})"
    )
    if st.button(escape_md(f"Open run {new_run_id}"), key=f"ctl-open-fork-{new_run_id}"):
        go(run=new_run_id)


def _remember(run_id: str, box: str, key: str) -> None:
    """On a tick: a confirmation of the action (and fork step) chosen at that moment, read
    from their widgets' state, which already holds a change made in the same
    interaction; on an untick, none."""
    state = st.session_state
    choice = actions.confirmed_choice(
        state.get(f"ctl-action-{run_id}"), state.get(f"ctl-step-{run_id}"), run_id
    )
    state[key] = actions.confirm(choice or "") if state.get(box) else None


def _take_tick(box: str, key: str, applied: str) -> None:
    """On Apply, before the page is drawn again: the tick's confirmation goes to the
    action (``applied``) and the box is cleared, so the next Apply needs a new tick."""
    state = st.session_state
    state[applied] = state.pop(key, None) if state.get(box) else None
    state[box] = False
