"""Errors a caller may want to tell apart from a node's own exceptions."""

from __future__ import annotations


class RunSetupError(ValueError):
    """A run could not start (unknown or duplicate run, nothing to resume, another graph);
    no node ran and nothing recorded was changed."""


class UnknownRunError(RunSetupError, KeyError):
    """No run with this id in the ledger."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown run"


class StepConflict(RuntimeError):
    """Another runner already committed this step: this one stops and writes nothing (G1)."""


class SendRefused(ValueError):
    """A value could not be sent to a run: the run has finished, or its key already has a
    value (each key of a run takes one value). Nothing was written."""

    def __init__(self, message: str, *, run_id: str, key: str) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.key = key
