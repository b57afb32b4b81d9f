"""pocoflow.logging keeps the 0.2 API on dd-logging, and is silent until asked to log."""

from __future__ import annotations

import inspect
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pocoflow.logging import disable_logging, get_logger, setup_logging

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def restore_pocoflow_logger() -> Iterator[logging.Logger]:
    """Put the ``pocoflow`` logger back as it was: handlers, level, propagation.

    setup_logging turns propagation off (as 0.2 did); left that way, later tests that
    use caplog on pocoflow loggers would see nothing.
    """
    root = logging.getLogger("pocoflow")
    saved = (list(root.handlers), root.level, root.propagate)
    yield root
    for handler in list(root.handlers):
        if handler not in saved[0]:
            root.removeHandler(handler)
            handler.close()
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    root.propagate = saved[2]


def _file_handlers(root: logging.Logger) -> list[logging.FileHandler]:
    return [h for h in root.handlers if isinstance(h, logging.FileHandler)]


def test_signatures_match_0_2() -> None:
    sig = inspect.signature(setup_logging)
    assert list(sig.parameters) == ["run_name", "log_level", "log_dir", "console", "adapter"]
    assert sig.parameters["run_name"].default == "pocoflow"
    assert sig.parameters["log_level"].default == "info"
    assert sig.parameters["log_dir"].default is None
    assert sig.parameters["console"].default is False
    assert sig.parameters["adapter"].default == ""
    for name in ("log_level", "log_dir", "console", "adapter"):
        assert sig.parameters[name].kind is inspect.Parameter.KEYWORD_ONLY
    assert list(inspect.signature(get_logger).parameters) == ["name"]
    assert list(inspect.signature(disable_logging).parameters) == []


def test_get_logger_lives_under_the_pocoflow_namespace() -> None:
    assert get_logger("node").name == "pocoflow.node"
    assert get_logger("ledger.sqlite").name == "pocoflow.ledger.sqlite"
    parent = get_logger("ledger")
    assert get_logger("ledger.sqlite").parent is parent
    assert get_logger("") is logging.getLogger("pocoflow")


def test_setup_logging_writes_a_file_under_log_dir(
    tmp_path: Path, restore_pocoflow_logger: logging.Logger
) -> None:
    log_dir = tmp_path / "nested" / "logs"
    path = setup_logging("unit-run", log_dir=log_dir, adapter="openrouter")

    assert path.is_absolute()
    assert path.parent == log_dir.resolve()
    assert path.name.startswith("unit-run-openrouter-")
    assert path.suffix == ".log"

    get_logger("flow").info("hello from the flow")
    get_logger("flow").debug("too detailed for info")
    for handler in _file_handlers(restore_pocoflow_logger):
        handler.flush()
    text = path.read_text(encoding="utf-8")
    assert "pocoflow.flow" in text
    assert "hello from the flow" in text
    assert "too detailed" not in text


def test_setup_logging_accepts_a_str_log_dir_and_level(tmp_path: Path) -> None:
    path = setup_logging("lvl", log_dir=str(tmp_path), log_level="debug")
    get_logger("node").debug("debug line")
    for handler in _file_handlers(logging.getLogger("pocoflow")):
        handler.flush()
    assert "debug line" in path.read_text(encoding="utf-8")


def test_log_dir_defaults_to_logs_under_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = setup_logging("cwd-run")
    assert path.parent == (tmp_path / "logs").resolve()
    assert path.exists()


def test_a_second_setup_replaces_the_first_handlers(
    tmp_path: Path, restore_pocoflow_logger: logging.Logger
) -> None:
    setup_logging("first", log_dir=tmp_path)
    second = setup_logging("second", log_dir=tmp_path)
    handlers = _file_handlers(restore_pocoflow_logger)
    assert len(handlers) == 1
    assert Path(handlers[0].baseFilename) == second


def test_console_adds_a_stderr_handler(
    tmp_path: Path, restore_pocoflow_logger: logging.Logger
) -> None:
    setup_logging("console", log_dir=tmp_path, console=True)
    streams = [
        h
        for h in restore_pocoflow_logger.handlers
        if type(h) is logging.StreamHandler  # FileHandler is a StreamHandler subclass
    ]
    assert len(streams) == 1


def test_disable_logging_removes_handlers_and_stays_silent(
    tmp_path: Path,
    restore_pocoflow_logger: logging.Logger,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = setup_logging("quiet", log_dir=tmp_path, console=True)
    disable_logging()

    assert _file_handlers(restore_pocoflow_logger) == []
    assert all(isinstance(h, logging.NullHandler) for h in restore_pocoflow_logger.handlers)
    get_logger("flow").warning("after disable")
    assert "after disable" not in path.read_text(encoding="utf-8")
    captured = capsys.readouterr()
    assert "after disable" not in captured.err + captured.out


_IMPORT_CHECK = """
import logging, os, sys
import pocoflow.logging

root = logging.getLogger("pocoflow")
assert [type(h) for h in root.handlers] == [logging.NullHandler], root.handlers
assert root.propagate
logging.getLogger("pocoflow.flow").warning("unconfigured warning")
assert not os.path.exists("logs"), "importing must not create a log dir"

# An application that configures the root logger still receives our records.
seen = []
handler = logging.Handler()
handler.emit = seen.append
logging.getLogger().addHandler(handler)
logging.getLogger("pocoflow.store").warning("to the app")
assert [r.getMessage() for r in seen] == ["to the app"], seen
"""


def test_import_only_adds_a_null_handler(tmp_path: Path) -> None:
    """A library user who never configures logging sees nothing and gets no log file."""
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_CHECK], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "unconfigured warning" not in proc.stderr
