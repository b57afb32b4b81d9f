"""Streamlit pieces every monitor page uses: navigation kept in the URL's query
parameters, the auto-refresh choice, a pager, a step slider and a run picker."""

from __future__ import annotations

from typing import Any

import streamlit as st

REFRESH = {"off": None, "5 s": 5, "10 s": 10, "30 s": 30}


def nav(target: str) -> None:
    label = {"runs": "← All runs", "workers": "Workers and stuck runs →"}[target]
    if st.button(label, key=f"nav-{target}"):
        go(view=None if target == "runs" else "workers", run=None)


def go(**changes: str | None) -> None:
    """Change the URL's query parameters and render again."""
    for key, value in changes.items():
        if value is None:
            if key in st.query_params:
                del st.query_params[key]
        else:
            st.query_params[key] = value
    st.rerun()


def refresh_every(key: str) -> int | None:
    """The auto-refresh period chosen (seconds, None = off), kept in the URL as
    ``refresh=5`` so a shared link refreshes too."""
    choices = list(REFRESH)
    given = f"{st.query_params.get('refresh', '')} s"
    index = choices.index(given) if given in choices else 0
    choice = st.selectbox("Auto-refresh", choices, index=index, key=key)
    seconds = REFRESH[choice]
    if seconds is None:
        st.query_params.pop("refresh", None)
    else:
        st.query_params["refresh"] = str(seconds)
    return seconds


def open_run_picker(run_ids: list[str], *, key: str) -> None:
    left, right = st.columns([4, 1])
    picked = left.selectbox("Run", run_ids, key=key, label_visibility="collapsed")
    if right.button("Open run", key=f"{key}-go") and picked:
        go(run=picked)


def page_offset(key: str, size: int) -> int:
    """The offset of the page the pager ``key`` shows: read before the query, because the
    pager itself is drawn after it, once the total is known."""
    return (int(st.session_state.get(key, 1)) - 1) * size


def paged(label: str, total: int, size: int, key: str) -> None:
    """Draw the pager ``key`` for ``total`` rows, ``size`` a page."""
    pages = max(1, -(-total // size))
    st.number_input(f"{label} page (of {pages})", 1, pages, 1, key=key)


def step_slider(label: str, bounds: tuple[int, int, int], value: int, key: str) -> int:
    low, high, _ = bounds
    if low == high:
        st.caption(f"{label}: {low}")
        return low
    return int(st.slider(label, low, high, value, key=key))


def ids(rows: list[dict[str, Any]]) -> list[str]:
    return [r["run_id"] for r in rows]
