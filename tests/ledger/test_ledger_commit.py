"""commit_step on every backend: atomic, one winner per (run_id, step), fenced, delta values."""

from __future__ import annotations

import datetime as dt
import threading
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy.exc import IntegrityError

from pocoflow import codec
from pocoflow.commit import NextStep, StepCommit
from pocoflow.store import Store

pytestmark = pytest.mark.ledger


def make_commit(
    run_id: str,
    step: int,
    previous: dict[str, int],
    changed: dict[str, Any],
    **extra: Any,
) -> StepCommit:
    """A StepCommit as a tracker builds it: changed keys point at ``step``."""
    manifest = {**previous, **dict.fromkeys(changed, step)}
    texts = {key: codec.encode(value, key=key) for key, value in changed.items()}
    extra.setdefault("node_name", "Node")
    extra.setdefault("action", "default")
    extra.setdefault("next_node", "Node")
    return StepCommit(run_id=run_id, step=step, manifest=manifest, changed=texts, **extra)


def start(db, run_id: str = "r1", **data: Any) -> dict[str, int]:
    db.create_run(run_id, "f", initial_store=data or {"n": 0}, start_node="Node")
    return dict.fromkeys(data or {"n": 0}, -1)


def test_commit_writes_checkpoint_values_events_and_run_in_one_go(db):
    manifest = start(db, n=0, text="keep")
    ok = db.commit_step(
        make_commit(
            "r1",
            0,
            manifest,
            {"n": 1},
            events=[
                {"event": "node_start", "step": 0, "node_name": "Node"},
                {"event": "node_end", "step": 0, "node_name": "Node", "elapsed_ms": 3.5},
            ],
            run_fields={"total_steps": 1, "current_node": "Node"},
        )
    )
    assert ok is True
    assert db.load_checkpoint("r1", 0).as_dict() == {"n": 1, "text": "keep"}
    row = db.get_checkpoint("r1", 0)
    assert (row["node_name"], row["next_node"], row["action"]) == ("Node", "Node", "default")
    assert row["store_json"] is None
    assert [e["event"] for e in db.get_events("r1")] == ["node_start", "node_end"]
    run = db.get_run("r1")
    assert (run["total_steps"], run["current_node"]) == (1, "Node")
    assert db.count_committed("r1") == 1
    assert db.latest_checkpoint("r1")["step"] == 0


def test_second_commit_of_a_step_returns_false_and_changes_nothing(db):
    manifest = start(db)
    first = make_commit(
        "r1", 0, manifest, {"n": 1}, events=[{"event": "a"}], run_fields={"total_steps": 1}
    )
    assert db.commit_step(first) is True
    before = (db.get_events("r1"), db.get_run("r1"), db.count_values("r1"))
    second = make_commit(
        "r1",
        0,
        manifest,
        {"n": 99, "extra": "x"},
        node_name="Other",
        events=[{"event": "b"}],
        run_fields={"total_steps": 42, "error_msg": "loser"},
    )
    assert db.commit_step(second) is False
    assert (db.get_events("r1"), db.get_run("r1"), db.count_values("r1")) == before
    assert db.load_checkpoint("r1", 0).as_dict() == {"n": 1}
    assert db.get_checkpoint("r1", 0)["node_name"] == "Node"


def test_a_failing_commit_leaves_no_partial_step(db):
    manifest = start(db)
    db.insert_step("r1", 1, "Node")  # the successor's outbox row already exists: a bug
    commit = make_commit(
        "r1", 0, manifest, {"n": 1}, events=[{"event": "x"}], next_step=NextStep(1, "Node")
    )
    assert db.commit_step(commit) is False  # a conflict, as a stale commit's successor meets
    assert db.latest_checkpoint("r1")["step"] == -1
    assert db.get_events("r1") == [] and db.count_values("r1") == 1  # the initial n only
    broken = make_commit("r1", 0, manifest, {"n": 1}, events=[{"event": None}])
    with pytest.raises(IntegrityError):  # pf_events.event is NOT NULL
        db.commit_step(broken)
    assert db.latest_checkpoint("r1")["step"] == -1
    assert db.get_events("r1") == [] and db.count_values("r1") == 1
    assert db.commit_step(make_commit("r1", 0, manifest, {"n": 1})) is True


def test_commit_for_unknown_run_raises_key_error(db):
    with pytest.raises(KeyError, match="ghost"):
        db.commit_step(make_commit("ghost", 0, {}, {"n": 1}))


def test_commit_rejects_a_manifest_that_loses_a_changed_value(db):
    start(db)
    bad = StepCommit("r1", 0, "Node", None, None, manifest={"n": -1}, changed={"n": "1"})
    with pytest.raises(ValueError, match="'n'"):
        db.commit_step(bad)
    with pytest.raises(ValueError, match="bogus"):
        db.commit_step(make_commit("r1", 0, {}, {"n": 1}, run_fields={"bogus": 1}))
    assert db.latest_checkpoint("r1")["step"] == -1


@pytest.mark.parametrize("threads", [8])
def test_racing_commits_of_one_step_have_exactly_one_winner(db, threads):
    manifest = start(db)
    barrier = threading.Barrier(threads)
    results: list[bool] = []
    errors: list[BaseException] = []

    def commit(i: int) -> None:
        c = make_commit(
            "r1", 0, manifest, {"n": i, f"k{i}": i}, node_name=f"W{i}", events=[{"event": f"e{i}"}]
        )
        barrier.wait()
        try:
            results.append(db.commit_step(c))
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=commit, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
    assert errors == []
    assert sorted(results) == [False] * (threads - 1) + [True]
    winner = db.get_checkpoint("r1", 0)["node_name"]
    i = int(winner[1:])
    assert db.load_checkpoint("r1", 0).as_dict() == {"n": i, f"k{i}": i}
    assert [e["event"] for e in db.get_events("r1")] == [f"e{i}"]
    assert db.count_values("r1") == 3  # initial n + the winner's two


def test_fencing_a_stale_attempt_commits_nothing(db):
    manifest = start(db)
    assert db.insert_step("r1", 0, "Node", lease_s=10, now=100.0)
    assert db.claim_step("r1", 0, 1, "w1", lease_s=10, now=100.0)
    # w1 stalls past its lease; the sweeper hands the step to attempt 2.
    assert db.take_over("r1", 0, 1, lease_s=10, now=111.0) == 2
    stale = make_commit(
        "r1", 0, manifest, {"n": 1}, attempt=1, worker="w1", events=[{"event": "stale"}]
    )
    assert db.commit_step(stale) is False
    assert db.latest_checkpoint("r1")["step"] == -1 and db.get_events("r1") == []

    assert db.claim_step("r1", 0, 2, "w2", lease_s=10, now=112.0)
    fresh = make_commit(
        "r1", 0, manifest, {"n": 2}, attempt=2, worker="w2", next_step=NextStep(1, "Node", 1, 125.0)
    )
    assert db.commit_step(fresh, now=113.0) is True
    assert db.get_step("r1", 0)["status"] == "committed"
    successor = db.get_step("r1", 1)
    assert (successor["status"], successor["attempt"], successor["sent_at"]) == ("queued", 1, None)
    assert (successor["lease_expires_at"], successor["created_at"]) == (125.0, 113.0)
    # A duplicate delivery of attempt 2 after the commit: fenced too.
    again = make_commit("r1", 0, manifest, {"n": 3}, attempt=2, worker="w2")
    assert db.commit_step(again) is False
    assert db.load_checkpoint("r1", 0)["n"] == 2


def test_unchanged_values_are_written_once_and_every_step_loads_whole(db):
    big = "x" * 50_000
    manifest = start(db, blob=big, counter=0)
    for step in range(6):
        commit = make_commit("r1", step, manifest, {"counter": step + 1})
        assert db.commit_step(commit)
        manifest = commit.manifest
    assert db.count_values("r1", "blob") == 1
    assert db.count_values("r1", "counter") == 7
    for step in range(-1, 6):
        assert db.load_checkpoint("r1", step).as_dict() == {"blob": big, "counter": step + 1}
    store, loaded_manifest, texts = db.load_store("r1", 5)
    assert loaded_manifest == {"blob": -1, "counter": 5}
    assert texts == {"blob": codec.encode(big, key="blob"), "counter": "6"}
    assert list(store.keys()) == ["blob", "counter"]


def test_deleted_keys_leave_the_store(db):
    manifest = start(db, a=1, b=2)
    commit = make_commit("r1", 0, {"a": manifest["a"]}, {"c": 3})
    assert db.commit_step(commit)
    assert db.load_checkpoint("r1", 0).as_dict() == {"a": 1, "c": 3}
    assert db.load_checkpoint("r1", -1).as_dict() == {"a": 1, "b": 2}


RICH = {
    "when": dt.datetime(2026, 11, 24, 8, 30, 1, 123456, tzinfo=dt.UTC),
    "naive": dt.datetime(2020, 2, 29, 23, 59),
    "day": dt.date(2026, 1, 2),
    "price": Decimal("12.340"),
    "raw": b"\x00\xff\x10bytes",
    "nested": {"list": [1.5, None, True], "when": dt.date(2020, 1, 1)},
    "text": "ünïcødé ✓",
}


def test_rich_values_round_trip_losslessly(db):
    db.create_run("r1", initial_store=dict(RICH))
    db.save_checkpoint("r1", 0, "A", Store(dict(RICH)))
    assert db.commit_step(make_commit("r1", 1, {}, dict(RICH)))
    for step in (-1, 0, 1):
        restored = db.load_checkpoint("r1", step)
        for key, value in RICH.items():
            assert restored[key] == value and type(restored[key]) is type(value), (step, key)


def test_value_that_cannot_round_trip_names_the_key_and_writes_nothing(db):
    db.create_run("r1")
    with pytest.raises(TypeError, match="handle"):
        db.save_checkpoint("r1", 0, "A", Store({"ok": 1, "handle": threading.Lock()}))
    with pytest.raises(TypeError, match="handle"):
        db.create_run("r2", initial_store={"handle": threading.Lock()})
    assert db.get_checkpoints("r1") == [] and db.get_run("r2") is None


def test_legacy_style_full_checkpoint_seeds_a_delta_commit(db):
    db.create_run("r1")
    db.save_checkpoint("r1", 0, "A", Store({"x": 1, "y": [1, 2]}))
    _store, manifest, texts = db.load_store("r1", 0)
    assert manifest == {"x": 0, "y": 0} and texts == {"x": "1", "y": "[1,2]"}
    assert db.commit_step(make_commit("r1", 1, manifest, {"x": 2}))
    assert db.load_checkpoint("r1", 1).as_dict() == {"x": 2, "y": [1, 2]}


def test_a_worker_commit_closes_its_attempt_in_the_same_transaction(db):
    manifest = start(db)
    assert db.insert_step("r1", 0, "Node", lease_s=10, now=100.0)
    assert db.claim_step("r1", 0, 1, "w1", lease_s=10, now=100.0, task_id="t-1")
    lost = make_commit("r1", 0, manifest, {"n": 1}, attempt=9, worker="w1")
    assert db.commit_step(lost, now=101.0) is False
    (attempt,) = db.get_attempts("r1")
    assert attempt["ended_at"] is None  # a refused commit closes nothing

    won = make_commit("r1", 0, manifest, {"n": 1}, attempt=1, worker="w1")
    assert db.commit_step(won, now=102.0) is True
    (attempt,) = db.get_attempts("r1")
    assert (attempt["outcome"], attempt["ended_at"], attempt["task_id"]) == (
        "committed",
        102.0,
        "t-1",
    )


def claim_to_run(
    db, step: int = 0, *, flow: str = "f", node: str = "Node", holder: str = "w1#1"
) -> Any:
    return db.claim_to_run(
        "r1", step, 1, "w1", 10, holder=holder, node_id=node, flow=flow, load_step=step - 1
    )


def test_a_claim_brings_the_run_and_its_store_in_the_same_batch(db):
    db.create_run("r1", "f", initial_store=Store({"n": 5, "s": "x"}, name="mine"))
    assert db.insert_step("r1", 0, "Node", lease_s=10, now=100.0)
    claimed, run, (store, manifest, texts) = claim_to_run(db)
    assert claimed and run["run_id"] == "r1" and db.get_step("r1", 0)["status"] == "running"
    assert store.as_dict() == {"n": 5, "s": "x"} and store.name == "mine"  # the run's Store
    assert manifest == {"n": -1, "s": -1} and set(texts) == {"n", "s"}
    assert claim_to_run(db, holder="w2#1")[::2] == (False, None)  # a duplicate: no Store
    assert db.claim_to_run(
        "nope", 0, 1, "w1", 10, holder="w1#1", node_id="Node", flow="f", load_step=-1
    ) == (False, None, None)


def test_a_retried_claim_batch_reads_the_same_store_and_opens_no_second_attempt(db):
    """The try after a COMMIT whose outcome was lost (``retried``: the claim and its
    attempt row as two statements, the row only if not open yet) wins again for the same
    holder, with the same rows of the read, and for no other holder."""
    from pocoflow.ledger import checkpoints, steps

    start(db, n=5)
    assert db.insert_step("r1", 0, "Node", lease_s=10, now=100.0)

    def claim(holder: str, retried: bool) -> Any:
        def body(conn: Any) -> Any:
            read = checkpoints.load_op(db.dialect, "r1", -1)
            return steps.claim_reading_run(
                conn, "r1", 0, 1, "w1", holder, 10, 101.0, node_id="Node", flow="f",
                if_runnable=True, retried=retried, then_read=read,
            )  # fmt: skip

        return db._write(body, "claiming", "r1", batched=True)

    won, run, rows = claim("w1#1", retried=False)
    assert won and run["run_id"] == "r1" and rows
    assert claim("w1#1", retried=True) == (True, run, rows)
    assert len(db.get_attempts("r1")) == 1
    assert claim("w2#1", retried=True)[::2] == (False, [])


def test_a_claim_refuses_a_message_naming_another_flow_or_node(db):
    start(db)
    assert db.insert_step("r1", 0, "Node", lease_s=10, now=100.0)
    claimed, run, store = claim_to_run(db, flow="other")
    assert (claimed, run["flow_name"], store) == (False, "f", None)
    assert claim_to_run(db, node="Other")[0] is False
    assert db.get_step("r1", 0)["status"] == "queued" and db.get_attempts("r1") == []
    assert claim_to_run(db)[0] is True


def test_a_claim_whose_store_cannot_be_read_still_wins_without_it(db, monkeypatch):
    start(db)
    assert db.insert_step("r1", 0, "Node", lease_s=10, now=100.0)
    assert db.insert_step("r1", 1, "Node", lease_s=10, now=100.0)
    # No checkpoint of step 0: the caller reads it again under its claim, and fails there.
    claimed, _run, store = claim_to_run(db, step=1)
    assert (claimed, store) == (True, None) and db.get_step("r1", 1)["status"] == "running"

    def undecodable(text: str, key: str) -> Any:
        raise codec.CodecError(f"cannot decode {key!r}")

    monkeypatch.setattr(codec, "decode", undecodable)
    claimed, _run, store = claim_to_run(db)
    assert (claimed, store) == (True, None) and db.get_step("r1", 0)["status"] == "running"


def test_claim_if_runnable_claims_only_a_run_that_may_go_on(db):
    start(db)
    assert db.insert_step("r1", 0, "Node", lease_s=10, now=100.0)
    db.set_control("r1", "pause")
    claimed, run = db.claim_if_runnable("r1", 0, 1, "w1", 10, now=101.0)
    assert (claimed, run["control"]) == (False, "pause")
    assert db.get_step("r1", 0)["status"] == "queued" and db.get_attempts("r1") == []

    db.set_control("r1", None)
    claimed, run = db.claim_if_runnable("r1", 0, 1, "w1", 10, now=102.0)
    assert claimed and run["run_id"] == "r1"
    assert db.get_step("r1", 0)["status"] == "running"
    again, _ = db.claim_if_runnable("r1", 0, 1, "w2", 10, now=103.0)  # a duplicate
    assert again is False and len(db.get_attempts("r1")) == 1
    assert db.claim_if_runnable("nope", 0, 1, "w1", 10) == (False, None)


def test_a_submitted_run_is_created_with_its_first_step_in_one_transaction(db):
    first = NextStep(0, "Node", 1, 110.0)
    start_event = [{"event": "flow_start", "node_name": "Node"}]
    assert db.create_run(
        "r1", "f", status="queued", initial_store={"n": 0}, start_node="Node",
        start_events=start_event, first_step=first, now=100.0,
    )  # fmt: skip
    step = db.get_step("r1", 0)
    assert (step["status"], step["attempt"], step["lease_expires_at"]) == ("queued", 1, 110.0)
    assert [e["event"] for e in db.get_events("r1")] == ["flow_start"]
    # A duplicate id writes nothing at all: no second event, the outbox row untouched.
    assert not db.create_run(
        "r1", "f", initial_store={"n": 9}, start_events=start_event,
        first_step=NextStep(0, "Other", 5, 999.0),
    )  # fmt: skip
    assert [e["event"] for e in db.get_events("r1")] == ["flow_start"]
    assert db.get_step("r1", 0)["node_id"] == "Node" and db.load_checkpoint("r1", -1)["n"] == 0
