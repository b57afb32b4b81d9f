"""Flow: runs a graph of nodes against one Store, with hooks, checkpoints and a ledger.

The Flow decides what runs next; where it runs is the executor's business: ``run`` and
``run_background`` execute in this process, ``submit`` hands the same graph to Celery
workers. A Flow is itself a Node, so a flow can be a step of another flow.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import uuid4

from pocoflow import itemlog, pausing
from pocoflow.errors import RunSetupError, StepConflict, UnknownRunError
from pocoflow.graph import Graph
from pocoflow.hooks import RUN_CANCELLED, RUN_RESUMED, Hooks
from pocoflow.limits import LimitGate, current_limiter
from pocoflow.logging import get_logger
from pocoflow.node import Node
from pocoflow.recorder import RunRecorder, open_ledger
from pocoflow.runner import RunControl, RunHandle
from pocoflow.step import RunCancelled, StepError, run_step
from pocoflow.store import Store
from pocoflow.usage import Budget, budget_message, summarize
from pocoflow.waiting import PARKED, SIGNALLED, SignalReader, WaitingFor

if TYPE_CHECKING:
    from pocoflow.db import WorkflowDB

_log = get_logger("flow")


def make_run_id(flow_name: str) -> str:
    return f"{flow_name}-{uuid4().hex[:8]}"


def as_store(store: Store | dict[str, Any] | None) -> Store:
    if store is None:
        return Store()
    if isinstance(store, Store):
        return store
    if isinstance(store, dict):
        return Store(data=store)
    raise TypeError(f"A flow runs on a Store or a dict, got {type(store).__name__}")


class Flow(Node):
    """A directed graph of nodes from ``start``.

    ``checkpoint_dir`` writes ``step_NNN_<Node>.json`` after each node; ``db_path`` (a file
    path or an SQLAlchemy URL) records the run, its events and a checkpoint per node in
    one transaction; ``max_steps`` stops runaway loops; ``schema`` is the Store schema a
    run's Store gets when it is rebuilt from the ledger (on a worker, by ``resume``).
    """

    def __init__(
        self,
        start: Node,
        checkpoint_dir: str | Path | None = None,
        max_steps: int = 100,
        db_path: str | Path | None = None,
        run_id: str | None = None,
        flow_name: str | None = None,
        *,
        schema: Mapping[str, Any] | None = None,
        max_tokens: int | None = None,
        max_cost_usd: float | None = None,
    ) -> None:
        if not isinstance(start, Node):
            raise TypeError(f"Flow(start=...) needs a Node, got {type(start).__name__}")
        if not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")
        self.flow_name = flow_name or type(start).__name__
        super().__init__(name=self.flow_name)
        self.start = start
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.max_steps = max_steps
        self.db_path = db_path
        self.run_id = run_id
        #: The Store schema of this flow's runs, applied wherever a run's Store is rebuilt
        #: from the ledger (a worker's step, ``resume``, ``fork``): schemas are code, not
        #: data, so the flow's code carries it. Building a Store with it registers its
        #: types with the codec, so this process decodes them too.
        self.schema = dict(schema) if schema else None
        if self.schema:
            Store(schema=self.schema)
        #: The run budget: a run that has reported more tokens (input + output) or cost
        #: pauses before its next node; ``resume`` can raise it.
        self.budget = Budget(max_tokens, max_cost_usd)
        #: ``MODULE:BUILDER`` this flow was built by, when the CLI built it: recorded with
        #: its runs, so ``pocoflow resume`` and ``fork`` find the graph by themselves.
        self.builder: str | None = None
        self._run_id: str | None = None
        self._usage: Any = None  # the last run's usage sink (``usage()``)
        self._hooks = Hooks()
        if self.checkpoint_dir:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)

    # ── configuration ─────────────────────────────────────────────────────────

    def on(self, event: str, callback: Callable[..., Any]) -> Flow:
        """Register a hook: node_start(name, store), node_end(name, action, elapsed_s,
        store), node_error(name, exc, store), flow_end(steps, store). Returns self."""
        self._hooks.add(event, callback)
        return self

    def graph(self) -> Graph:
        """The graph a run of this flow steps through (its ids and fingerprint)."""
        return Graph(self._entry())

    def _entry(self) -> Node:
        """The first node of a run of this flow: its start node (a BatchFlow's run is the
        batch itself, one step)."""
        return self.start

    @property
    def last_run_id(self) -> str | None:
        return self._run_id

    @property
    def max_tokens(self) -> int | None:
        return self.budget.max_tokens

    @property
    def max_cost_usd(self) -> float | None:
        return self.budget.max_cost_usd

    def usage(self) -> dict[str, Any]:
        """Usage of this flow's last run in this process (``RunHandle.usage()``'s dict):
        from the ledger when it has one, else kept in memory on the run."""
        if self._usage is None:
            raise RunSetupError(f"Flow {self.flow_name!r} has not run in this process yet")
        return usage_of(self._usage, self._run_id)

    def _ledger(self) -> WorkflowDB | None:
        return open_ledger(self.db_path) if self.db_path else None

    # ── running in this process ───────────────────────────────────────────────

    def run(self, store: Store | dict[str, Any], resume_from: Node | None = None) -> Store:
        """Run until the graph ends; returns the (mutated) Store.

        ``resume_from`` starts a new run at that node, e.g. with a Store restored from a
        checkpoint (0.2 style); ``resume(run_id)`` continues a recorded run instead.
        """
        return self._run_new(as_store(store), resume_from, self.run_id, RunControl())

    def run_background(
        self, store: Store | dict[str, Any], resume_from: Node | None = None
    ) -> RunHandle:
        """Start the run on a daemon thread and return its handle at once."""
        store = as_store(store)
        run_id = self.run_id or make_run_id(self.flow_name)
        self._run_id = run_id
        control = RunControl()
        return self._in_thread(
            run_id, control, store, lambda: self._run_new(store, resume_from, run_id, control)
        )

    def resume(
        self,
        run_id: str,
        *,
        schema: dict[str, Any] | None = None,
        background: bool = False,
        max_tokens: int | None = None,
        max_cost_usd: float | None = None,
    ) -> Store | RunHandle:
        """Continue a recorded run (failed, cancelled, paused, waiting, interrupted) from
        its last checkpoint, with the node that checkpoint says runs next (a node that
        waited runs again from ``prep``, and ``wait_for`` returns the value sent since).
        ``schema`` re-applies the Store's schema (schemas are code, not data, so the
        ledger does not keep them). ``max_tokens`` / ``max_cost_usd`` raise the run's
        recorded budget (a run paused on its budget goes on only once it is under it)."""
        db = self._require_ledger("resume")
        plan = _ResumePlan.load(db, run_id, self, schema or self.schema)
        control = RunControl()
        control.budget = plan.budget.raised(max_tokens, max_cost_usd)
        if control.budget != plan.budget:
            db.set_budget(run_id, max_tokens=max_tokens, max_cost_usd=max_cost_usd)
        if background:
            return self._in_thread(
                run_id, control, plan.store, lambda: self._continue(plan, control)
            )
        return self._continue(plan, control)

    def fork(
        self,
        run_id: str,
        from_step: int,
        *,
        new_run_id: str | None = None,
        schema: dict[str, Any] | None = None,
    ) -> Store:
        """Start a new run from checkpoint ``from_step`` of ``run_id``; the original run is
        left untouched. Steps keep their numbers, so the fork's first step is
        ``from_step + 1``."""
        db = self._require_ledger("fork")
        run = db.get_run(run_id)
        if run is None:
            raise UnknownRunError(f"Unknown run id {run_id!r}")
        next_id = fork_point(db, run_id, from_step, run, self.max_steps)["next_node"]
        store = _with_schema(
            db.load_checkpoint(run_id, from_step), db, run_id, schema or self.schema, run
        )
        graph = self.graph()
        fork_id = new_run_id or make_run_id(self.flow_name)
        self._run_id = fork_id
        recorder = RunRecorder(fork_id, db, self.checkpoint_dir)
        recorder.start(
            store,
            flow_name=self.flow_name,
            fingerprint=graph.fingerprint,
            max_steps=self.max_steps,
            start_id=next_id,
            start_name=graph.node(next_id).name,
            initial_step=from_step,
            parent_run_id=run_id,
            forked_from_step=from_step,
            budget=self.budget,
            builder=self.builder,
        )
        control = RunControl()
        control.budget = self.budget  # the fork's own budget: its usage starts at zero
        return self._loop(graph, graph.node(next_id), store, from_step + 1, recorder, control)

    # ── running on Celery workers ─────────────────────────────────────────────

    def submit(self, store: Store | dict[str, Any], *, run_id: str | None = None) -> RunHandle:
        """Start the run on the Celery workers and return its handle at once.

        Only registered flows (``@flow("name")``) can be submitted: workers find the graph
        by that name.
        """
        from pocoflow.distributed.client import submit

        return submit(self, as_store(store), run_id=run_id)

    # ── internals ─────────────────────────────────────────────────────────────

    def _require_ledger(self, what: str) -> WorkflowDB:
        db = self._ledger()
        if db is None:
            raise RunSetupError(f"Flow {self.flow_name!r}: {what}() needs a ledger (db_path=...)")
        return db

    def _in_thread(
        self, run_id: str, control: RunControl, store: Store, target: Callable[[], Store]
    ) -> RunHandle:
        done = threading.Event()
        box: list[Any] = []

        def body() -> None:
            try:
                box.append(target())
            except BaseException as exc:
                box.append(exc)
            finally:
                done.set()

        thread = threading.Thread(target=body, daemon=True, name=f"pocoflow-{run_id}")
        # A handle can resume this run: its budget holds it (paused) rather than ending it.
        control.held_by_handle = True
        thread.start()
        _log.info("Flow %r started in background, run_id=%s", self.flow_name, run_id)
        return RunHandle(
            run_id,
            thread,
            done,
            box,
            db=self._ledger(),
            control=control,
            initial_store=store,
            usage=lambda: usage_of(control.usage, run_id),
        )

    def _run_new(
        self, store: Store, start: Node | None, run_id: str | None, control: RunControl
    ) -> Store:
        current = start or self._entry()
        run_id = run_id or make_run_id(self.flow_name)
        self._run_id = run_id
        recorder = RunRecorder(run_id, self._ledger(), self.checkpoint_dir)
        if control.budget is None:
            control.budget = self.budget
        graph = None
        if recorder.db is not None:  # ids and fingerprint only matter to the ledger
            graph = self.graph()
            if current not in graph:
                graph = Graph(current)  # 0.2 allowed resuming at any node
            recorder.start(
                store,
                flow_name=self.flow_name,
                fingerprint=graph.fingerprint,
                max_steps=self.max_steps,
                start_id=graph.id_of(current),
                start_name=current.name,
                budget=self.budget,
                builder=self.builder,
            )
        return self._loop(graph, current, store, 0, recorder, control)

    def _continue(self, plan: _ResumePlan, control: RunControl) -> Store:
        self._run_id = plan.run_id
        recorder = RunRecorder(plan.run_id, plan.db, self.checkpoint_dir)
        recorder.resume_from(plan.store, plan.manifest, plan.texts)
        # From the status the plan read, not any resumable one: of two processes resuming
        # a stopped run (a waiting run after its send), one wins and the other runs
        # nothing. (An interrupted run reads ``running``: that race stays open.)
        if not plan.db.update_run_if(
            plan.run_id,
            status_in=(plan.status,),
            status="running",
            error_msg=None,
            completed_at=None,
            control=None,
        ):
            raise RunSetupError(f"Run {plan.run_id!r} changed status while resuming; look again")
        plan.db.save_event(plan.run_id, RUN_RESUMED, step=plan.step)
        if plan.node is None:
            recorder.empty_run_done()
            return plan.store
        return self._loop(
            plan.graph, plan.node, plan.store, plan.step, recorder, control, resumed=True
        )

    def _loop(
        self,
        graph: Graph | None,
        current: Node | None,
        store: Store,
        step: int,
        recorder: RunRecorder,
        control: RunControl,
        resumed: bool = False,
    ) -> Store:
        # Local runs wait in place for their limits (this process's limiter).
        gate = LimitGate(current_limiter(), self.flow_name)
        try:
            return self._steps(graph, current, store, step, recorder, control, resumed, gate)
        finally:
            # However the run ends here (done, cancelled, failed, held): the waits it
            # queued in a shared limiter go (no round trip unless a call was refused).
            gate.forget_refused(recorder.run_id)

    def _steps(
        self,
        graph: Graph | None,
        current: Node | None,
        store: Store,
        step: int,
        recorder: RunRecorder,
        control: RunControl,
        resumed: bool,
        gate: LimitGate,
    ) -> Store:
        run_id = recorder.run_id
        record = recorder.db is not None
        hooks = self._hooks
        self._usage = control.usage = recorder.usage
        cancel_probe = control.cancel_event.is_set
        is_running = control._running.is_set
        signals = recorder.signal_reader()
        steps_run = 0
        again = step if resumed else -1  # the step that may have run before
        between = pausing.ItemGate(recorder, control)  # a pause met between map items
        while current is not None:
            if record:
                requested = recorder.requested_control()
                if requested == "cancel":  # the requester recorded the cancel already
                    return self._cancelled(recorder, control, step, store, current.name, False)
                if requested == "pause" and not pausing.hold_for_ledger(recorder, control, step):
                    # A cancel the ledger gave was recorded by its requester; one from
                    # this run's own handle, while held, is this process's to record.
                    own = control.cancelled and recorder.requested_control() != "cancel"
                    return self._cancelled(recorder, control, step, store, current.name, own)
            budget = control.budget
            # A cancel first: a run held by its budget must not pause itself again once
            # cancel() woke it (its wait() would never return).
            if (
                budget is not None
                and budget.limited
                and not cancel_probe()
                and not self._within(budget, recorder, step)
            ):
                if not control.held_by_handle:
                    recorder.hold(step)  # paused in the ledger: resume(run_id, max_tokens=)
                    return store
                control.pause()  # a handle's run waits for handle.resume(max_tokens=...)
            if not is_running():
                # A cancel from another process while held ended the run (G4): go on only
                # if the run is still this process's paused run.
                if not pausing.hold_for_handle(recorder, control, step):
                    return self._cancelled(recorder, control, step, store, current.name, False)
                continue  # look again: a cancel, or a budget still spent
            if cancel_probe():
                return self._cancelled(recorder, control, step, store, current.name)
            if step >= self.max_steps:
                message = (
                    f"Flow {self.flow_name!r} exceeded max_steps={self.max_steps} at node "
                    f"{current.name!r} (run {run_id}). Check for an unintended loop or raise "
                    "max_steps."
                )
                recorder.ended_early(step, "failed", "node_error", message)
                raise RuntimeError(message)
            # A MapNode (or a parallel BatchFlow) keeps its finished items (passes); only a
            # step that ran before (the first of a resume, one run again after a wait)
            # reads what an earlier try kept.
            log_token = between_token = None
            if current._runs_items:  # a MapNode, or a sub-flow that may hold one
                between.at_step(step)
                between_token = pausing.CURRENT.set(between)
                if record and current._keeps_items:
                    log = recorder.item_log(step, current, may_have_kept=step == again)
                    log_token = itemlog.CURRENT.set(log)
            try:
                done = run_step(
                    current,
                    store,
                    step=step,
                    hooks=hooks,
                    run_id=run_id,
                    cancel_probe=cancel_probe,
                    record=record,
                    usage_sink=recorder.usage,
                    signals=signals,
                    limit_gate=gate,
                )
            except RunCancelled as stop:
                # A cancel recorded by another process, met between map items, stands.
                recorded = isinstance(stop, pausing.CancelledInLedger)
                return self._cancelled(recorder, control, step, store, current.name, not recorded)
            except WaitingFor as waiting:
                found = recorder.wait(step, current.name, waiting)
                if found == PARKED:
                    _log.info(
                        "Run %s waits for %r at node %r; send it, then flow.resume(%r)",
                        run_id,
                        waiting.key,
                        current.name,
                        run_id,
                    )
                    return store
                if found != SIGNALLED and recorder.requested_control() is None:
                    _log.warning("Run %s stopped running while %r waited", run_id, current.name)
                    return store
                recorder.rewind(store, step)  # the node runs again from prep
                again = step
                continue  # the value came meanwhile; a cancel or pause is met at the top
            except StepError as error:
                _log.error("Flow %r aborted at node %r: %s", self.flow_name, current.name, error)
                recorder.failed(step, error.events, str(error.cause))
                raise error.cause from None
            finally:
                if between_token is not None:
                    pausing.CURRENT.reset(between_token)
                if log_token is not None:
                    itemlog.CURRENT.reset(log_token)
            following = current.next_node(done.action)
            if recorder.active:
                try:
                    recorder.step_done(
                        store,
                        step=step,
                        node_name=current.name,
                        action=done.action,
                        next_id=(
                            graph.id_of(following)
                            if graph is not None and following is not None
                            else None
                        ),
                        next_name=following.name if following is not None else None,
                        events=done.events,
                    )
                except StepConflict:
                    raise  # the step belongs to another runner: record nothing
                except Exception as exc:  # e.g. a value that cannot round-trip (G7)
                    message = f"checkpoint of step {step} ({current.name}) failed: {exc}"
                    recorder.failed(step, [], message)
                    raise
            step += 1
            steps_run += 1
            current = following
        if steps_run == 0:
            recorder.empty_run_done()
        hooks.fire("flow_end", step, store)
        return store

    def _within(self, budget: Budget, recorder: RunRecorder, step: int) -> bool:
        """True while the run's reported usage is within ``budget``; otherwise record
        why it pauses before ``step`` (only runs with a budget pay for the read)."""
        reason = budget.exceeded(*recorder.usage.totals(recorder.run_id))
        if reason is None:
            return True
        message = budget_message(recorder.run_id, reason, step)
        _log.warning("%s", message)
        recorder.budget_exceeded(step, message)
        return False

    def _cancelled(
        self,
        recorder: RunRecorder,
        control: RunControl,
        step: int,
        store: Store,
        node: str,
        record: bool = True,
    ) -> Store:
        _log.info("Run %s cancelled before node %r", recorder.run_id, node)
        control.stopped_by_cancel = True
        if record:
            recorder.ended_early(step, "cancelled", RUN_CANCELLED, "cancelled")
        self._hooks.fire("flow_end", step, store)  # 0.2 fired it on cancel too
        return store

    # ── a Flow used as a node of another flow ────────────────────────────────

    def _run(self, store: Any) -> str | None:
        """Run the inner graph on the outer Store; its last action routes the outer flow."""
        prep_result = self.prep(store)
        last_action = self._orchestrate(
            as_store(store) if isinstance(store, dict) else store,
            self.params if self._in_pass else None,
        )
        return self.post(store, prep_result, last_action)

    _is_flow = True
    _runs_items = True
    _outer_context: tuple[
        str | None, int | None, int, Callable[[], bool] | None, SignalReader | None
    ] = (None, None, 1, None, None)

    def _orchestrate(
        self, store: Store, params: Mapping[str, Any] | None = None, *, fire_end: bool = True
    ) -> str | None:
        """The inner graph runs inside one outer step: a cancel between inner nodes stops
        the outer step uncommitted, so a resume re-runs the sub-flow from its start.

        With ``params`` (a BatchFlow pass) each node runs as a shallow copy carrying them,
        as in PocketFlow: the node objects are shared by every pass, and passes may run
        side by side, so what ``run_step`` sets on a node (``params``, ``run_id``,
        ``step``...) must land on an object of the pass's own."""
        run_id, _, attempt, cancel_probe, signals = self._outer_context
        current: Node | None = self.start
        action: str | None = None
        steps = 0
        while current is not None:
            if cancel_probe is not None and cancel_probe():
                raise RunCancelled(f"sub-flow {self.flow_name!r} cancelled before {current.name!r}")
            if steps >= self.max_steps:
                raise RuntimeError(
                    f"Sub-flow {self.flow_name!r} exceeded max_steps={self.max_steps}"
                )
            node = current
            if params is not None:
                node = copy.copy(current)
                node.params, node._in_pass = params, True
            action = run_step(
                node,
                store,
                step=steps,
                hooks=self._hooks,
                run_id=run_id,
                attempt=attempt,
                cancel_probe=cancel_probe,
                signals=signals,
                limit_gate=self._limit_gate,
            ).action
            current = current.next_node(action)
            steps += 1
        if fire_end:
            self._hooks.fire("flow_end", steps, store)
        return action

    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str | None:
        return exec_result


@dataclass
class _ResumePlan:
    """Where a recorded run stands: its Store, the next step and the node to run."""

    db: WorkflowDB
    run_id: str
    graph: Graph
    store: Store
    manifest: dict[str, int]
    texts: dict[str, str]
    step: int
    node: Node | None
    budget: Budget
    #: The run's status when the plan was read: what the resume moves it from.
    status: str

    @classmethod
    def load(
        cls, db: WorkflowDB, run_id: str, flow: Flow, schema: dict[str, Any] | None
    ) -> _ResumePlan:
        run = db.get_run(run_id)
        if run is None:
            raise UnknownRunError(f"Unknown run id {run_id!r}")
        if run["status"] not in _RESUMABLE:
            raise RunSetupError(
                f"Run {run_id!r} is {run['status']}: only a failed, cancelled, paused, "
                "waiting or interrupted run can be resumed"
            )
        if run.get("queue"):
            # Submitted runs carry their queue. Their steps are leased and fenced in the
            # ledger, which this process's loop does not do: it would run beside the
            # workers (a paused or cancelled run's queued step is swept to one as soon
            # as the run is running again), and two executors could each commit.
            raise RunSetupError(
                f"Run {run_id!r} was submitted to the workers (queue {run['queue']!r}) and "
                f"is {run['status']}; resume it there, where its steps are fenced: "
                f"`pocoflow resume {run_id}` or `attach({run_id!r}).resume()`"
            )
        graph = flow.graph()
        recorded = run.get("fingerprint")
        if recorded and recorded != graph.fingerprint:
            raise RunSetupError(
                f"Run {run_id!r} was recorded with another graph of flow {run['flow_name']!r} "
                f"(fingerprint {recorded}, this one {graph.fingerprint}); run it with the "
                "flow code it started with, or fork it"
            )
        latest = db.latest_checkpoint(run_id)
        next_id: str | None
        if latest is None:
            step, next_id = -1, graph.start_id
        else:
            step, next_id = latest["step"], latest.get("next_node")
            if next_id is None:
                # A new-format last step commits "completed" with it, so this is a 0.2
                # checkpoint, which never said which node runs next.
                raise RunSetupError(
                    f"Run {run_id!r}: checkpoint {step} does not record the node that runs "
                    "next (a run recorded by pocoflow 0.2); restart it with "
                    "flow.run(db.load_checkpoint(run_id, step), resume_from=node)"
                )
        loaded, manifest, texts = db.load_store(run_id, step)
        store = _with_schema(loaded, db, run_id, schema, run)
        return cls(
            db=db,
            run_id=run_id,
            graph=graph,
            store=store,
            manifest=manifest,
            texts=texts,
            step=step + 1,
            node=graph.node(next_id) if next_id is not None else None,
            budget=Budget(run.get("max_tokens"), run.get("max_cost_usd")),
            status=run["status"],
        )


_RESUMABLE = ("failed", "cancelled", "paused", "running", "queued", "waiting")


def fork_point(
    db: WorkflowDB,
    run_id: str,
    from_step: int,
    run: dict[str, Any],
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Checkpoint ``from_step`` of run ``run`` (its ledger row), to start a fork from:
    ``RunSetupError`` naming run and step when there is no such checkpoint, it records
    no next node, or the fork's first step would already be past ``max_steps``. "Was its
    last step" is said only of the run's latest checkpoint: an earlier one without a next
    node was written by 0.2 (or ``save_checkpoint``), which did not record one, and a fork
    would not know which node to run."""
    try:
        checkpoint = db.get_checkpoint(run_id, from_step)
    except KeyError:
        first = run.get("forked_from_step")
        hint = ""
        if first is not None and from_step < first:
            hint = (
                f" (a fork of {run.get('parent_run_id')!r}: its first checkpoint is its fork "
                f"point, step {first})"
            )
        raise RunSetupError(
            f"Run {run_id!r} has no checkpoint of step {from_step} to fork from{hint}"
        ) from None
    if checkpoint.get("next_node") is None:
        latest = db.latest_checkpoint(run_id)
        if latest is not None and latest["step"] == from_step:
            raise RunSetupError(
                f"Run {run_id!r} step {from_step} was its last step: there is nothing to fork "
                "from it"
            )
        raise RunSetupError(
            f"Run {run_id!r} step {from_step}: its checkpoint records no next node (a 0.2 "
            "checkpoint, or one written by save_checkpoint), so there is no node to fork to"
        )
    if max_steps is not None and from_step + 1 >= max_steps:
        raise RunSetupError(
            f"Run {run_id!r} step {from_step}: the fork's first step would be "
            f"{from_step + 1}, past the flow's max_steps={max_steps}"
        )
    return checkpoint


def _with_schema(
    loaded: Store,
    db: WorkflowDB,
    run_id: str,
    schema: dict[str, Any] | None,
    run: dict[str, Any] | None = None,
) -> Store:
    """The loaded values under the run's Store name and the caller's schema."""
    run = run or db.get_run(run_id) or {}
    return Store(loaded.as_dict(), schema=schema, name=run.get("store_name") or loaded.name)


def usage_of(sink: Any, run_id: str | None) -> dict[str, Any]:
    """A run's ``RunHandle.usage()`` dict from its sink: the ledger's rows, or memory."""
    if sink is None:  # not started yet
        return summarize([])
    db = getattr(sink, "db", None)
    if db is not None and run_id is not None:
        return db.get_usage(run_id)
    return sink.summary()
