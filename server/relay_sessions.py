"""The sessions one relay stream holds, as arrays: how the aggregator reads a batch of relayed columns.

Contract
--------
* One `HeldSessions` per relay stream (server/upstream.py). `bind(ref, held)` on a relayed Hello, `unbind(ref)`
  when the session's stream ended; `rows(refs)` maps a column of refs to rows (-1: unknown) with one search.
* Per row it keeps what the per-record path keeps in objects: the StreamValidator's last seq and step and the
  highest seq the Ingestor applied (RankState.sessions). The arrays are authoritative while only columns arrive;
  `push(row)` writes them to the objects before a frame of the session takes the per-record path, `pull(row)`
  reads them back after (both O(1)).
* `check(rows, columns)` is StreamValidator.check for every report of a batch at once: True when each passes
  (then `advance()` records them as checked); False sends the batch through the per-record path, which rejects
  exactly the reports the validator rejects. `fresh(rows, seq)`: reports not applied yet (the others are
  duplicates, re-sent after a reconnect).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradwatch.server.relay_columns import HAS_LOSS_SCALE, HAS_SHARE, Columns
from gradwatch.server.validate import MAX_INT64

__all__ = ["HeldSessions"]


class HeldSessions:
    """Rows of a relay stream's held sessions (see the module docstring)."""

    def __init__(self) -> None:
        self.held: list[Any] = []  # row -> upstream._Held (None: a free row)
        self._free: list[int] = []
        self._by_ref: dict[int, int] = {}
        self._sorted_refs = np.zeros(0, dtype=np.uint64)
        self._sorted_rows = np.zeros(0, dtype=np.int64)
        self._dirty = False
        self.rank = np.zeros(0, dtype=np.int64)
        #: Row -> a small number for its run (rows of one run share it), to split a batch by run.
        self.run_code = np.zeros(0, dtype=np.int64)
        self._run_codes: dict[str, int] = {}
        self.last_seq = np.zeros(0, dtype=np.int64)
        self.last_step = np.full(0, -1, dtype=np.int64)
        self.applied = np.zeros(0, dtype=np.int64)
        #: Row -> its Session and RankState, for gathering per report with one indexing.
        self.sessions = np.zeros(0, dtype=object)
        self.states = np.zeros(0, dtype=object)

    def bind(self, ref: int, held: Any) -> None:
        if ref in self._by_ref:
            return
        row = self._free.pop() if self._free else self._grow()
        self.held[row] = held
        held.row = row
        self._by_ref[ref] = row
        self._dirty = True
        self.pull(row)

    def unbind(self, ref: int) -> None:
        row = self._by_ref.pop(ref, None)
        if row is not None:
            self.push(row)
            self.held[row].row = -1
            self.held[row] = None
            self.sessions[row] = self.states[row] = None
            self._free.append(row)
            self._dirty = True

    def push_all(self) -> None:
        for row in self._by_ref.values():
            self.push(row)

    def rows(self, refs: np.ndarray) -> np.ndarray:
        if self._dirty:
            items = sorted(self._by_ref.items())
            self._sorted_refs = np.fromiter((r for r, _ in items), dtype=np.uint64, count=len(items))
            self._sorted_rows = np.fromiter((w for _, w in items), dtype=np.int64, count=len(items))
            self._dirty = False
        if self._sorted_refs.size == 0:
            return np.full(refs.size, -1, dtype=np.int64)
        at = np.minimum(np.searchsorted(self._sorted_refs, refs), self._sorted_refs.size - 1)
        return np.where(self._sorted_refs[at] == refs, self._sorted_rows[at], -1)

    def push(self, row: int) -> None:
        """The arrays into the validator and the rank's applied seq (before the per-record path)."""
        held = self.held[row]
        held.validator.resume(int(self.last_seq[row]), int(self.last_step[row]))
        session = held.session
        rank = session.run.ranks.get(session.hello.rank)
        if rank is not None and self.applied[row] > rank.sessions.get(session.hello.session_id, 0):
            rank.sessions[session.hello.session_id] = int(self.applied[row])

    def pull(self, row: int) -> None:
        """The validator's and the rank's state into the arrays (after the per-record path)."""
        held = self.held[row]
        session = held.session
        self.last_seq[row], self.last_step[row] = held.validator.position()
        rank = session.run.ranks.get(session.hello.rank)
        self.applied[row] = rank.sessions.get(session.hello.session_id, 0) if rank is not None else 0
        self.rank[row] = session.hello.rank
        self.run_code[row] = self._run_codes.setdefault(session.run.run_id, len(self._run_codes))
        self.sessions[row], self.states[row] = session, rank

    def check(self, rows: np.ndarray, columns: Columns) -> bool:
        seq, step = columns.seq, columns.step
        if (seq == 0).any() or (seq > MAX_INT64).any() or (step > MAX_INT64).any():
            return False
        if (columns.optimizer_step > MAX_INT64).any():
            return False
        seq, step = seq.astype(np.int64), step.astype(np.int64)
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        first = np.r_[True, ordered[1:] != ordered[:-1]]
        previous_seq = np.where(first, self.last_seq[ordered], np.r_[0, seq[order][:-1]])
        previous_step = np.where(first, self.last_step[ordered], np.r_[0, step[order][:-1]])
        if (seq[order] <= previous_seq).any() or (step[order] < previous_step).any():
            return False
        with np.errstate(invalid="ignore"):
            bad = (columns.grad_sum_squares < 0) | (columns.step_duration_s < 0) | (columns.agent_time_s < 0)
            bad |= columns.has(HAS_SHARE) & (columns.grad_global_share < 0)
            bad |= columns.has(HAS_LOSS_SCALE) & ~(columns.loss_scale >= 0)
            bad |= ~np.isfinite(columns.wall_time)
        return not bad.any()

    def advance(self, rows: np.ndarray, columns: Columns) -> None:
        """Checked reports: each row's last seq and step are its last report's (they rise)."""
        np.maximum.at(self.last_step, rows, columns.step.astype(np.int64))
        np.maximum.at(self.last_seq, rows, columns.seq.astype(np.int64))

    def fresh(self, rows: np.ndarray, seq: np.ndarray) -> np.ndarray:
        return seq.astype(np.int64) > self.applied[rows]

    def applied_upto(self, rows: np.ndarray, seq: np.ndarray) -> None:
        np.maximum.at(self.applied, rows, seq.astype(np.int64))

    def _grow(self) -> int:
        row = len(self.held)
        self.held.append(None)
        if row >= self.rank.size:  # capacity doubles: binding n sessions costs O(n) in all
            size = max(64, 2 * self.rank.size)
            for name in ("rank", "run_code", "last_seq", "last_step", "applied", "sessions", "states"):
                old = getattr(self, name)
                grown = np.zeros(size, dtype=old.dtype)
                grown[: old.size] = old
                setattr(self, name, grown)
        return row
