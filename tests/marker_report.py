"""``pytest -p tests.marker_report --collect-only``: prints each collected test's folder
markers after the conftest hook ran (for tests/unit/test_suite_hygiene.py)."""

from __future__ import annotations

import pytest

from tests.conftest import folder_markers_of


def pytest_collection_finish(session: pytest.Session) -> None:
    for item in session.items:
        print(f"MARKERS {item.nodeid} {','.join(sorted(folder_markers_of(item)))}")
