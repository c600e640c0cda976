"""collective_hang's judgement on generated runs (no torch): for any world size, culprit set and moment, a stuck
run names exactly the culprits with the right verdict, and a run in which anything still moves (a step, a
collective counter, a declared pause ending) names nobody. Also the wire bounds of CollectiveProgress.

The real multi-process proof is tests/test_e2e_hang.py; these cover the classes of run around it.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gradwatch.server.collectives import MAX_FRAMES, MAX_GROUPS, check_progress, user_frames
from gradwatch.server.detectors.collective_hang import CollectiveHangConfig, CollectiveHangDetector
from gradwatch.server.detectors.straggler import StragglerConfig, StragglerDetector
from gradwatch.server.ranktable import RankTable
from gradwatch.v1 import gradwatch_pb2 as pb

STEP_S = 0.1
CONFIG = CollectiveHangConfig()
USER_FILE = "/home/me/train.py"


def _progress(entered: dict[str, int], pending: dict[str, tuple[int, str, int]] | None = None, *,
              stack: bool = False, still: float = 60.0, paused: str = "") -> pb.CollectiveProgress:  # fmt: skip
    progress = pb.CollectiveProgress(completions_known=True, paused=paused)
    for name, seq in entered.items():
        group = progress.groups.add(group=name, size=4, entered=seq, completed=seq)
        if pending and name in pending:
            pending_seq, op, numel = pending[name]
            group.completed, group.pending_seq, group.pending_op, group.pending_numel = (
                pending_seq - 1,
                pending_seq,
                op,
                numel,
            )
    if stack:
        progress.stack.add(file="/usr/lib/python3.11/threading.py", line=320, function="wait")
        progress.stack.add(file=USER_FILE, line=42, function="train_step")
        progress.stack_still_s = still
    return progress


def _table(world: int, steps: int = 10, unreported: int | None = None) -> RankTable:
    """A run whose ranks all joined and reported `steps` steps (except rank `unreported`: none)."""
    table = RankTable(world)
    for rank in range(world):
        table.join(rank, world, f"host-{rank}", 0, world, 0.0)
        for step in range(1, steps + 1 if rank != unreported else 1):
            table.report(rank, step, STEP_S, 0.01, step * STEP_S)
    return table


def _beat(table: RankTable, rank: int, progress: pb.CollectiveProgress, now: float) -> None:
    """A heartbeat from `rank` carrying `progress`, as the ingest applies it."""
    table.heard(rank, int(table.last_step[rank]), now)
    table.collectives.update(rank, progress, now)


def _fired(detector: CollectiveHangDetector, table: RankTable, now: float, *,
           beats: dict[int, pb.CollectiveProgress] | None = None) -> tuple[set[int], str]:  # fmt: skip
    """The ranks a tick at `now` names and its summary; `beats`: heartbeats (unchanged progress) just before."""
    for rank, progress in (beats or {}).items():
        _beat(table, rank, progress, now)
    findings = detector.tick(table, now)
    named = {f.rank for f in findings if hasattr(f.verdict, "summary")}
    summaries = {f.verdict.summary for f in findings if hasattr(f.verdict, "summary")}  # type: ignore[union-attr]
    assert len(summaries) <= 1
    return named, next(iter(summaries), "")


worlds = st.integers(min_value=2, max_value=12)


@settings(max_examples=60, deadline=None)
@given(world=worlds, data=st.data())
def test_ranks_that_never_entered_the_collective_are_named_with_their_line(world: int, data: st.DataObject) -> None:
    culprits = set(data.draw(st.sets(st.integers(0, world - 1), min_size=1, max_size=world - 1)))
    table, detector, last = _table(world), CollectiveHangDetector(CONFIG), 10 * STEP_S
    beats = {}
    for rank in range(world):
        if rank in culprits:
            beats[rank] = _progress({"0": 40}, stack=True)
        else:
            beats[rank] = _progress({"0": 41}, {"0": (41, "all_reduce", 1000)})
        _beat(table, rank, beats[rank], last)
    assert _fired(detector, table, last + CONFIG.floor_s - 1, beats=beats) == (set(), "")  # not yet
    named, summary = _fired(detector, table, last + CONFIG.floor_s + 1, beats=beats)
    assert named == culprits
    assert summary.startswith("stuck before the collective") and "all_reduce (group '0', seq 41" in summary
    assert f"{USER_FILE}:42 in train_step (innermost /usr/lib/python3.11/threading.py:320 in wait)" in summary


@settings(max_examples=60, deadline=None)
@given(world=worlds, data=st.data())
def test_a_rank_in_a_collective_the_others_never_entered_is_the_mismatch(world: int, data: st.DataObject) -> None:
    odd = data.draw(st.integers(0, world - 1))
    extra = data.draw(
        st.sampled_from([("1", 1, "all_reduce", 1), ("0", 41, "broadcast", 1000), ("0", 41, "all_reduce", 7)])
    )
    table, detector, last = _table(world), CollectiveHangDetector(CONFIG), 10 * STEP_S
    beats = {}
    for rank in range(world):
        if rank == odd:
            group, seq, op, numel = extra
            beats[rank] = _progress({"0": 41 if group == "0" else 40, "1": 1 if group == "1" else 0},
                                    {group: (seq, op, numel)}, stack=True)  # fmt: skip
        else:
            beats[rank] = _progress({"0": 41, "1": 0}, {"0": (41, "all_reduce", 1000)})
        _beat(table, rank, beats[rank], last)
    named, summary = _fired(detector, table, last + CONFIG.floor_s + 1, beats=beats)
    if world == 2:  # no majority: both sides are named
        assert named == {0, 1} and summary.startswith("mismatched collectives")
        return
    assert named == {odd}, summary
    assert (
        summary.startswith("mismatched collectives")
        and f"rank {odd} waits in {extra[2]} (group '{extra[0]}'" in summary
    )


@settings(max_examples=60, deadline=None)
@given(world=worlds, data=st.data())
def test_a_dead_rank_is_named_at_once_unless_the_others_go_on(world: int, data: st.DataObject) -> None:
    dead = data.draw(st.integers(0, world - 1))
    others_advance = data.draw(st.booleans())
    reported = data.draw(st.booleans())  # a rank may die before any of its (batched) reports arrived
    table = _table(world, unreported=None if reported else dead)
    detector, last = CollectiveHangDetector(CONFIG), 10 * STEP_S
    waiting = _progress({"0": 41}, {"0": (41, "all_reduce", 1000)})
    for rank in range(world):
        _beat(table, rank, waiting, last)
    table.collectives.disconnected(dead, last)
    later = last + CONFIG.dead_after_s + 1
    if others_advance:
        for rank in set(range(world)) - {dead}:
            table.report(rank, 11, STEP_S, 0.01, later)
    named, summary = _fired(detector, table, later, beats={r: waiting for r in range(world) if r != dead})
    if others_advance:
        assert named == set()
    else:
        last_report = "step 10" if reported else "none received"
        assert named == {dead} and summary.startswith(f"dead rank: rank {dead} (host-{dead}) died (last report: "
                                                      f"{last_report})")  # fmt: skip
        assert "inside all_reduce (group '0', seq 41, 1000 elements)" in summary


@settings(max_examples=60, deadline=None)
@given(world=worlds, data=st.data())
def test_nothing_fires_while_anything_moves_or_a_pause_is_declared(world: int, data: st.DataObject) -> None:
    """Half the ranks wait in a collective, the rest in Python; over minutes, one of: a rank's step, a rank's
    collective counter, or a declared pause keeps the run from being stuck."""
    how = data.draw(st.sampled_from(["step", "collective", "pause", "working"]))
    mover = data.draw(st.integers(0, world - 1))
    table, detector, last = _table(world), CollectiveHangDetector(CONFIG), 10 * STEP_S
    seq = 41
    for tick in range(1, 121):
        now = last + tick
        for rank in range(world):
            waiting = rank % 2 == 0
            if how == "collective" and rank == mover:
                seq += 1
            entered = seq if rank == mover and how == "collective" else 41
            progress = _progress({"0": entered}, {"0": (entered, "all_reduce", 10)} if waiting else None,
                                 stack=not waiting, still=1.0 if how == "working" else 60.0,
                                 paused="checkpoint" if how == "pause" and rank == mover else "")  # fmt: skip
            _beat(table, rank, progress, now)
        if how == "step" and tick % 10 == 0:
            table.report(mover, 10 + tick, 10.0, 0.01, now)
        assert _fired(detector, table, now) == (set(), ""), (how, tick)


def test_a_declared_pause_ending_restarts_the_clock() -> None:
    table, detector, last = _table(3), CollectiveHangDetector(CONFIG), 10 * STEP_S
    beats = {r: _progress({"0": 41}, {"0": (41, "barrier", 1)}) for r in (1, 2)}
    beats[0] = _progress({"0": 40}, stack=True, paused="checkpoint")
    assert _fired(detector, table, last + 100, beats=beats) == (set(), "")
    resumed = last + 100
    beats[0] = _progress({"0": 40}, stack=True)  # the pause ended; rank 0 has not reached the barrier yet
    assert _fired(detector, table, resumed, beats=beats) == (set(), "")
    assert _fired(detector, table, resumed + CONFIG.floor_s - 1, beats=beats) == (set(), "")
    assert _fired(detector, table, resumed + CONFIG.floor_s + 1, beats=beats)[0] == {0}  # and then stuck: named


def test_an_older_snapshot_never_moves_progress_backwards() -> None:
    table = _table(2)
    board = table.collectives
    board.update(0, _progress({"0": 41}, {"0": (41, "all_reduce", 10)}), 5.0)
    board.update(0, _progress({"0": 39}), 6.0)  # a report made before the heartbeat, delivered after it
    assert board.moved_at[0] == 5.0 and board.groups[0]["0"].entered == 41


def test_straggler_prefers_between_collective_times_when_every_rank_has_them() -> None:
    # Equal pre-forward times (the slow work sits after the forward), different between-collective times.
    table = _table(2, steps=0)
    detector = StragglerDetector(StragglerConfig(consecutive=1, min_reports=4))
    for step in range(1, 9):
        for rank in (0, 1):
            table.report(rank, step, 0.08, 0.02, step * 0.08)
            table.collectives.between(rank, 0.02 if rank == 0 else 0.06)
    findings = detector.tick(table, 1.0)
    assert [f.rank for f in findings] == [1] and findings[0].verdict.value < 0.75  # type: ignore[union-attr]


@given(st.lists(st.tuples(st.sampled_from(["/usr/lib/python3.11/x.py", "/v/site-packages/torch/a.py", "<string>",
                                            "/job/train.py", "/job/data.py"]), st.integers(1, 99),
                          st.just("f")), max_size=10))  # fmt: skip
def test_user_frames_are_the_innermost_frames_outside_libraries(stack: list[tuple[str, int, str]]) -> None:
    frames = user_frames(tuple(stack))
    own = [f for f in stack if f[0].startswith("/job/")]
    assert frames == (own[:2] or stack[:1])


def test_progress_out_of_bounds_is_rejected_with_a_reason() -> None:
    assert check_progress(_progress({"0": 3}, stack=True)) is None
    too_many = pb.CollectiveProgress(groups=[pb.CollectiveGroup(group=str(i)) for i in range(MAX_GROUPS + 1)])
    assert "groups" in (check_progress(too_many) or "")
    deep = pb.CollectiveProgress(stack=[pb.StackFrame(file="a.py")] * (MAX_FRAMES + 1))
    assert "frames" in (check_progress(deep) or "")
    backwards = pb.CollectiveProgress(groups=[pb.CollectiveGroup(group="0", entered=3, completed=4)])
    assert "beyond entered" in (check_progress(backwards) or "")
    repeated = pb.CollectiveProgress(groups=[pb.CollectiveGroup(group="0")] * 2)
    assert "repeated" in (check_progress(repeated) or "")
    assert "finite" in (check_progress(pb.CollectiveProgress(idle_s=float("nan"))) or "")
