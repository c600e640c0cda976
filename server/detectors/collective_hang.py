"""collective_hang: the run stopped, and this is the rank (and the collective, and the line) that stopped it.

Rationale
---------
In a hang every rank waits in a collective for one that never arrives; all of them stop reporting at once,
the backend's watchdog fires after 10 minutes (NCCL's default timeout is 600 s) and every rank's log says
"timeout" without saying who. The agent sends, on every report and on a 2 s heartbeat from its sender thread
(which keeps running while training is stuck), each process group's collective sequence numbers (entered,
completed, the oldest collective still in flight: op, size, seq) and, once its training thread has been idle
past its own threshold, that thread's Python stack (agent/collectives.py; `server/collectives.py` holds it).

The run is **stuck** when, for longer than

    max(floor_s, factor × the live ranks' median step time)

no live rank's step advanced and no rank's collective counters rose (a step made of many long collectives is
progress), and no rank declared a pause (`monitor.pause("checkpoint")`; its end restarts the clock). A job
that is merely slow keeps advancing and is never stuck: that is `throughput_drop`'s business. Then the
verdict, from the ranks' collective state:

* **dead**: a rank's stream ended without a goodbye and it did not come back within `dead_after_s` (or it sent
  nothing for `silent_after_s`), while the other ranks made no progress since (they wait for it, or failed
  in the collective it left: gloo notices a dead peer, NCCL waits for the watchdog). Judged at once, not
  after the stuck threshold: a dead rank cannot come back into the collective. Not when every rank died
  (the job was killed).
* **stuck before the collective**: some ranks wait in a collective (entered, not completed) and others are
  in none: those did not enter it. Named with the collective the others wait in and their stack's innermost
  frame of user code. Not while such a rank's stack keeps changing (`stack_still_s` below half the
  threshold): it is working through Python code (an evaluation, a slow save), not blocked.
* **mismatch**: every rank waits in a collective, but not the same one (different group, sequence number,
  operation or size): the ranks in the minority issued a collective the others did not.
* **left**: a rank ended with an abnormal goodbye (an exception) while the others wait in a collective.
* **all waiting**: every rank waits in the same collective and none is missing: the backend or the network
  is stuck; every rank is named.

When nobody waits in a collective (every rank in Python: a deadlocked data loader on all ranks, a long
evaluation) this detector says nothing; `stalled` judges such runs on its longer floor. Without the flight
recorder (`completions_known` false) a rank behind the others' entered sequence number is the one missing.
The cost per tick is a few numpy operations over ranks; the per-rank analysis runs only while stuck.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gradwatch.server.collectives import CollectiveBoard, GroupState, format_frame, user_frames
from gradwatch.server.detectors.base import Clear, DetectorConfig, DetectorSpec, Finding, Fire
from gradwatch.server.ranktable import RankTable
from gradwatch.server.report import RankReport
from gradwatch.server.settings import setting

__all__ = ["SPEC", "CollectiveHangConfig", "CollectiveHangDetector"]

#: A pending collective's identity across ranks: (group, seq, op, numel).
Pending = tuple[str, int, str, int]
#: Goodbye reasons of a rank that ended normally (monitor.close(), interpreter exit).
NORMAL_EXITS = ("closed", "exit")


@dataclass(frozen=True)
class CollectiveHangConfig(DetectorConfig):
    floor_s: float = setting(
        15.0, doc="Never stuck before this many seconds without any step or collective progress.", gt=0.0
    )
    factor: float = setting(10.0, doc="... nor before factor × the live ranks' median step time.", gt=1.0)
    dead_after_s: float = setting(
        3.0, doc="A rank whose stream ended without a goodbye and did not reconnect this long is dead.", gt=0.0
    )
    silent_after_s: float = setting(
        15.0, doc="A rank without any frame (not even a heartbeat) this long is dead or frozen.", gt=0.0
    )
    min_reports: int = setting(2, doc="Reports a rank must have sent before its run is judged.", ge=1)


class CollectiveHangDetector:
    """Judges the run on each tick (see the module docstring)."""

    def __init__(self, config: CollectiveHangConfig) -> None:
        self._config = config
        self._firing: set[int] = set()

    def observe(self, report: RankReport, ranks: RankTable) -> Sequence[Finding]:
        return ()  # progress is in the tables already; the next tick judges and clears

    def tick(self, ranks: RankTable, now: float) -> Sequence[Finding]:
        board = ranks.collectives
        board.fit(ranks.size)
        named, summary, value = self._judge(ranks, board, now)
        step = np.maximum(ranks.last_step, 0)  # -1: no report yet (a rank that died at once)
        findings = [Finding(r, Clear(step=int(step[r]))) for r in sorted(self._firing - named)]
        for rank in sorted(named):
            findings.append(Finding(rank, Fire(step=int(step[rank]), value=value, summary=summary)))
        self._firing = named
        return findings

    # ------------------------------------------------------------------ judgement

    def _judge(self, ranks: RankTable, board: CollectiveBoard, now: float) -> tuple[set[int], str, float]:
        cfg = self._config
        judged = ranks.joined & (ranks.reports >= cfg.min_reports)
        if not judged.any():
            return set(), "", 0.0
        with np.errstate(invalid="ignore"):
            gone = np.isfinite(board.disconnected_at) & (now - board.disconnected_at >= cfg.dead_after_s)
            silent = ~ranks.finished & ((now - ranks.heard_at) > cfg.silent_after_s)
        # A rank can die before its first reports arrive (they leave in batches): joining is enough to be missed.
        dead = ranks.joined & (gone | silent) & ~ranks.finished
        judged &= ~dead
        if dead.any():
            return self._dead(ranks, board, judged, dead, now)
        live = judged & ~ranks.finished
        if not live.any() or (board.paused & live).any():
            return set(), "", 0.0
        last_move = float(np.nanmax(np.fmax(ranks.progress_at[live], board.moved_at[live])))
        step_time = ranks.step_time()[live]
        pace = float(np.nanmedian(step_time)) if np.isfinite(step_time).any() else 0.0
        threshold = max(cfg.floor_s, cfg.factor * pace)
        stuck_for = now - last_move
        if not stuck_for > threshold:
            return set(), "", 0.0
        left = [int(r) for r in np.flatnonzero(judged & ranks.finished) if board.goodbye_reason[r] not in NORMAL_EXITS]
        return self._stuck(ranks, board, np.flatnonzero(live), left, stuck_for, threshold)

    def _dead(self, ranks: RankTable, board: CollectiveBoard, judged: np.ndarray, dead: np.ndarray,
              now: float) -> tuple[set[int], str, float]:  # fmt: skip
        others = judged & ~dead
        if not others.any():
            return set(), "", 0.0  # every rank went at once: the job was stopped, not hung
        died_at = np.where(np.isfinite(board.disconnected_at), board.disconnected_at, ranks.heard_at)
        first_death = float(np.nanmin(died_at[dead]))
        # Others still advancing since: only the rank's stream went away (a network cut), not the job.
        advancing = others & ~ranks.finished & (ranks.progress_at > first_death + self._config.dead_after_s)
        if advancing.any():
            return set(), "", 0.0
        victims = np.flatnonzero(dead)
        parts = []
        for rank in victims:
            where = _waiting_text(board.groups[rank]) or _last_entered_text(board.groups[rank])
            last = f"step {int(ranks.last_step[rank])}" if ranks.last_step[rank] > 0 else "none received"
            parts.append(f"{ranks.describe(np.array([rank]))} died (last report: {last}): "
                         f"its stream ended without a goodbye{where}")  # fmt: skip
        failed = [int(r) for r in np.flatnonzero(others) if board.goodbye_reason[r] not in (None, *NORMAL_EXITS)]
        waiting = [int(r) for r in np.flatnonzero(others & ~ranks.finished)]
        tail = []
        if waiting:
            tail.append(f"{ranks.describe(np.array(waiting), limit=4)} wait for it"
                        f"{_common_wait_text(board, waiting)}")  # fmt: skip
        if failed:
            tail.append(f"{ranks.describe(np.array(failed), limit=4)} stopped with "
                        f"'{board.goodbye_reason[failed[0]]}' (failed in the collective it left)")  # fmt: skip
        summary = "dead rank: " + "; ".join(parts) + (f"; {'; '.join(tail)}" if tail else "")
        return {int(r) for r in victims}, summary, float(now - first_death)

    def _stuck(self, ranks: RankTable, board: CollectiveBoard, live: np.ndarray, left: list[int], stuck_for: float,
               threshold: float) -> tuple[set[int], str, float]:  # fmt: skip
        pace = f"no step or collective progress for {stuck_for:.0f} s, threshold {threshold:.0f} s"
        if board.known[live].all():
            pending = {int(r): _pending(board.groups[r]) for r in live}
        else:  # no flight recorder: entered sequence numbers only
            pending = _behind_from_sequence(board, live)
        waiting = [r for r in pending if pending[r]]
        idle = [r for r in pending if not pending[r]]
        if not waiting:
            return set(), "", 0.0  # nobody waits in a collective: not a collective hang (see `stalled`)
        if left:
            reasons = ", ".join(f"rank {r}: '{board.goodbye_reason[r]}', step {int(ranks.last_step[r])}" for r in left)
            summary = (f"a rank left the job ({pace}): {ranks.describe(np.array(left))} ended ({reasons}) while "
                       f"{ranks.describe(np.array(waiting), limit=4)} wait for it"
                       f"{_common_wait_text(board, waiting)}")  # fmt: skip
            return set(left), summary, stuck_for
        if idle:
            working = [r for r in idle if board.stacks[r] and board.stack_still_s[r] < threshold / 2]
            if working:
                return set(), "", 0.0  # its stack keeps changing: busy in Python, not blocked
            target = Counter(p for r in waiting for p in pending[r]).most_common(1)[0][0]
            summary = (f"stuck before the collective ({pace}): {ranks.describe(np.array(idle))} never entered "
                       f"{_pending_text(target)} that {ranks.describe(np.array(waiting), limit=4)} wait in"
                       f"{_stacks_text(ranks, board, idle)}")  # fmt: skip
            return set(idle), summary, stuck_for
        keys = {r: frozenset(pending[r]) for r in waiting}
        counts = Counter(keys.values())
        if len(counts) == 1:
            (only,) = counts
            summary = (f"all ranks wait in the same collective ({pace}): {_pending_text(min(only))}; no rank is "
                       "missing from it: the backend or the network is stuck")  # fmt: skip
            return set(waiting), summary, stuck_for
        majority, top = counts.most_common(1)[0]
        odd = [r for r in waiting if keys[r] != majority] if top * 2 > len(waiting) else waiting
        rest = [r for r in waiting if r not in odd]
        theirs = "; ".join(f"rank {r} waits in {_pending_text(min(keys[r]))}" for r in odd[:4])
        summary = (f"mismatched collectives ({pace}): {theirs}"
                   + (f", which {ranks.describe(np.array(rest), limit=4)} never entered: they wait in "
                      f"{_pending_text(min(majority))}" if rest else "")
                   + _stacks_text(ranks, board, odd))  # fmt: skip
        return set(odd), summary, stuck_for


def _pending(groups: dict[str, GroupState]) -> tuple[Pending, ...]:
    return tuple((name, g.pending_seq, g.pending_op, g.pending_numel) for name, g in sorted(groups.items())
                 if g.waiting)  # fmt: skip


def _behind_from_sequence(board: CollectiveBoard, live: np.ndarray) -> dict[int, tuple[Pending, ...]]:
    """Without completions: per group, the ranks at its highest entered number wait; those below are missing."""
    out: dict[int, tuple[Pending, ...]] = {int(r): () for r in live}
    names = {name for r in live for name in board.groups[r]}
    for name in sorted(names):
        entered = {int(r): board.groups[r][name].entered for r in live if name in board.groups[r]}
        top = max(entered.values())
        if min(entered.values()) < top:
            for r, seq in entered.items():
                if seq == top:
                    out[r] = (*out[r], (name, top, "", 0))
    return out


def _pending_text(key: Pending) -> str:
    name, seq, op, numel = key
    size = f", {numel} elements" if numel else ""
    return f"{op or 'the collective'} (group {name!r}, seq {seq}{size})"


def _waiting_text(groups: dict[str, GroupState]) -> str:
    pending = _pending(groups)
    return f", inside {_pending_text(pending[0])}" if pending else ""


def _last_entered_text(groups: dict[str, GroupState]) -> str:
    if not groups:
        return ""
    name, group = min(groups.items())
    return f", after collective seq {group.entered} of group {name!r}"


def _common_wait_text(board: CollectiveBoard, ranks: list[int]) -> str:
    keys = Counter(p for r in ranks for p in _pending(board.groups[r]))
    return f" in {_pending_text(keys.most_common(1)[0][0])}" if keys else ""


def _stacks_text(ranks: RankTable, board: CollectiveBoard, named: list[int]) -> str:
    parts = []
    for rank in named[:4]:
        stack = board.stacks[rank]
        frames = user_frames(stack)
        if not frames:
            continue
        inner = f" (innermost {format_frame(stack[0])})" if stack[0] != frames[0] else ""
        parts.append(f"rank {rank} at {' ← '.join(format_frame(f) for f in frames)}{inner}")
    return f"; {'; '.join(parts)}" if parts else ""


SPEC = DetectorSpec(
    name="collective_hang",
    severity="critical",
    description="The run is stuck in a collective: names the rank that did not enter it (or died, or issued "
    "another), the collective and the stuck line of code.",
    config_type=CollectiveHangConfig,
    factory=lambda config: CollectiveHangDetector(config),
    # The hang explains a stalled run, its lost throughput and the waiting ranks that look slow: page once.
    inhibits=("stalled", "throughput_drop", "straggler"),
    scope="run",
    observes=False,
)
