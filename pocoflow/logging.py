"""PocoFlow logging: the 0.2 API, a thin wrapper over dd-logging.

Kept signature for signature from pocoflow 0.2.1 so its users' start-up code runs
unchanged; dd-logging owns the file naming and format shared with the other Digital
Duck tools.

In every pocoflow module::

    from pocoflow.logging import get_logger

    _log = get_logger("node")  # -> the "pocoflow.node" logger

At application start-up, to write a log file::

    from pocoflow.logging import setup_logging

    setup_logging("my_run", log_level="debug")  # -> logs/my_run-<YYYYMMDD-HHMMSS>.log

Log hierarchy: ``pocoflow`` is the root (``setup_logging`` attaches its handlers there),
with ``pocoflow.store``, ``pocoflow.node``, ``pocoflow.flow``, ``pocoflow.db``,
``pocoflow.runner``, ... below it.

Importing this module only adds a ``NullHandler`` to the ``pocoflow`` logger (the
standard library-logging etiquette): an application that never calls ``setup_logging``
gets no "last resort" warnings on stderr, and one that configures the root logger still
receives PocoFlow's records through propagation.
"""

from __future__ import annotations

import logging
from pathlib import Path

from dd_logging import (
    disable_logging as _dd_disable,
    get_logger as _dd_get,
    setup_logging as _dd_setup,
)

__all__ = ["disable_logging", "get_logger", "setup_logging"]

_ROOT = "pocoflow"


def _ensure_null_handler() -> None:
    """Give the ``pocoflow`` root a NullHandler once, so records never hit ``lastResort``."""
    root = logging.getLogger(_ROOT)
    if not any(isinstance(h, logging.NullHandler) for h in root.handlers):
        root.addHandler(logging.NullHandler())


_ensure_null_handler()


def get_logger(name: str) -> logging.Logger:
    """Return the logger ``pocoflow.<name>`` (``""`` gives the ``pocoflow`` root itself).

    ``name`` is a dotted sub-path, e.g. ``"node"`` -> ``pocoflow.node``.
    """
    return _dd_get(name, _ROOT)


def setup_logging(
    run_name: str = "pocoflow",
    *,
    log_level: str = "info",
    log_dir: str | Path | None = None,
    console: bool = False,
    adapter: str = "",
) -> Path:
    """Attach a timestamped log file (and optionally stderr) to the ``pocoflow`` logger.

    Safe to call again: the handlers of an earlier call are closed and replaced, so a
    long-lived process can start a new file per run.

    Parameters
    ----------
    run_name :
        Short label used in the file name, e.g. ``"run"`` or ``"benchmark"``.
    log_level :
        ``"debug"`` | ``"info"`` | ``"warning"`` | ``"error"``.
    log_dir :
        Directory for log files, created if missing. Defaults to ``./logs`` under the
        current working directory.
    console :
        Also log to stderr (a CLI's ``--verbose``).
    adapter :
        LLM adapter name appended to the file name (e.g. ``"openrouter"``).

    Returns
    -------
    Path
        Absolute path of the created log file.

    Note: as in 0.2, the ``pocoflow`` logger stops propagating to the Python root logger
    once this is called (dd-logging does so to avoid duplicate lines under Streamlit).
    """
    return _dd_setup(
        run_name,
        root_name=_ROOT,
        log_level=log_level,
        log_dir=log_dir or (Path.cwd() / "logs"),
        console=console,
        adapter=adapter,
    )


def disable_logging() -> None:
    """Close and remove every handler of the ``pocoflow`` logger: silent mode.

    Unlike 0.2, a NullHandler is put back afterwards: a logger with no handler and no
    propagation falls back to Python's last-resort handler, which would print warnings
    to stderr, the opposite of silent.
    """
    _dd_disable(_ROOT)
    _ensure_null_handler()
