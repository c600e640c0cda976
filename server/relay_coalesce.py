"""Relayed columns of every relay stream applied per run together: the aggregator's batches as large as its runs
(ARCHITECTURE.md, "Two tiers").

Why: a batch has a fixed cost of some hundred microseconds (server/ingest_batch.py: the cross-rank detectors' plans,
the rank table, the rings), and a relay's batch holds only its own ranks' reports of the last ~0.25 s, split again
by run. A run spread over many relays (a node sidecar holds 8 ranks) paid that cost per relay and run; here it is
paid once per run and flush, whatever the number of relays.

Contract
--------
* `add(stream, columns, seq)` keeps a relay batch's checked-later columns (a batch of columns only: no frame, no
  verdict, every report finite; server/upstream.py decides) until `flush()`. `due()` says when a flush is due: the
  oldest kept columns are COALESCE_S old, or MAX_RECORDS reports are kept.
* `flush()` applies everything kept: per stream in arrival order the StreamValidator's checks as arrays
  (server/relay_sessions.py), then per run the reports of every stream as one batch through `Ingestor.apply_columns`
  (a run whose batch cannot be reproduced exactly goes one report at a time, stream by stream, in order). It returns
  per stream the highest batch seq applied and the commands for its ranks: the caller acknowledges them then.
* `apply(parts)` is the same for columns applied at once (a batch with frames, after a `flush()`).
* The caller flushes before anything else reaches the ingestor through a relay (a frame, a verdict, a Hello, a
  stream's end), before each tick and sweep, so a rank's reports are applied in its relay's order and ticks judge
  what arrived. What a flush changes for alerts: reports are received (RankTable times, ring rows) at the flush,
  at most COALESCE_S after they arrived.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from gradwatch.server.relay_columns import Columns
from gradwatch.server.validate import MALFORMED

if TYPE_CHECKING:
    from gradwatch.server.ingest import Ingestor
    from gradwatch.server.stats import IngestStats
    from gradwatch.v1 import gradwatch_pb2 as pb

__all__ = ["COALESCE_S", "MAX_RECORDS", "Coalescer", "batch_columns", "finite"]

#: How long columns wait for other relays' reports of their runs (the relays' own wait is 0.25 s).
COALESCE_S = 0.25
#: Kept reports beyond which a flush is due at once (bounds the memory and the pause one flush takes).
MAX_RECORDS = 16_384

Commands = list[tuple[str, int, "pb.Command"]]
#: (stream, rows of its HeldSessions, columns, commands): one report at a time through the per-record path.
OneByOne = Callable[[Any, np.ndarray, Columns, Commands], None]


@dataclass
class _Part:
    """One stream's reports of one run in a flush."""

    stream: Any
    rows: np.ndarray
    columns: Columns
    fresh: np.ndarray


@dataclass
class _Kept:
    stream: Any
    chunks: list[Columns] = field(default_factory=list)
    seq: int = 0


def batch_columns(batch: pb.RelayBatch, stats: IngestStats) -> Columns | None:
    """A RelayBatch's reports packed as columns; None without (or when malformed: counted, dropped)."""
    if not batch.HasField("columns"):
        return None
    try:
        columns = Columns.of(batch.columns)
    except ValueError:
        stats.rejected(MALFORMED)
        return None
    if columns.position.size and (np.diff(columns.position.astype(np.int64)) < 0).any():
        stats.rejected(MALFORMED)
        return None
    return columns


def finite(columns: Columns) -> bool:
    """No report of `columns` carries a non-finite value (a batch that has one is applied at once, in order)."""
    with np.errstate(invalid="ignore"):
        return not ((columns.non_finite != 0).any() or not np.isfinite(columns.loss).all()
                    or not np.isfinite(columns.grad_sum_squares).all())  # fmt: skip


def concat(chunks: list[Columns]) -> Columns:
    """The reports of `chunks`, in order, as one Columns."""
    if len(chunks) == 1:
        return chunks[0]
    return Columns(**{f.name: np.concatenate([getattr(c, f.name) for c in chunks]) for f in fields(Columns)})


class Coalescer:
    """Kept relayed columns and their application (see the module docstring)."""

    def __init__(self, ingestor: Ingestor, stats: IngestStats, unknown_reason: str, one_by_one: OneByOne,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self._ingestor = ingestor
        self._stats = stats
        self._unknown = unknown_reason
        self._one_by_one = one_by_one
        self._clock = clock
        self._kept: dict[int, _Kept] = {}
        self._records = 0
        self._since = 0.0

    def __len__(self) -> int:
        return self._records

    def add(self, stream: Any, columns: Columns | None, seq: int) -> None:
        if not self._kept:
            self._since = self._clock()
        kept = self._kept.get(id(stream))
        if kept is None:
            kept = self._kept[id(stream)] = _Kept(stream)
        if columns is not None and len(columns):
            kept.chunks.append(columns)
            self._records += len(columns)
        kept.seq = max(kept.seq, seq)

    def due(self) -> bool:
        return bool(self._kept) and (self._records >= MAX_RECORDS or self._clock() - self._since >= COALESCE_S)

    def flush(self) -> list[tuple[Any, int, Commands]]:
        """Apply everything kept; (stream, highest batch seq applied, commands) per stream that had any."""
        kept, self._kept, self._records = self._kept, {}, 0
        if not kept:
            return []
        parts = [(k.stream, concat(k.chunks)) for k in kept.values() if k.chunks]
        commands = self.apply(parts)
        return [(k.stream, k.seq, commands.get(id(k.stream), [])) for k in kept.values()]

    def apply(self, parts: list[tuple[Any, Columns]]) -> dict[int, Commands]:
        """Apply each (stream, columns) (streams in order); the commands for their ranks, by id(stream)."""
        out: dict[int, Commands] = {id(stream): [] for stream, _ in parts}
        runs: dict[int, list[_Part]] = {}
        for stream, columns in parts:
            for part in self._checked(stream, columns, out[id(stream)]):
                runs.setdefault(id(part.stream.table.sessions[part.rows[0]].run), []).append(part)
        for group in runs.values():
            self._apply_run(group, out)
        return out

    def _checked(self, stream: Any, columns: Columns, commands: Commands) -> list[_Part]:
        """The stream's reports by run, checked (an unknown session's are counted and dropped; a stream whose
        reports fail a check goes one report at a time here, which rejects exactly those)."""
        table = stream.table
        rows = table.rows(columns.ref)
        known = rows >= 0
        if not known.all():
            self._stats.rejected(self._unknown, int((~known).sum()))
            rows, columns = rows[known], columns.take(known)
        if not rows.size:
            return []
        if not table.check(rows, columns):
            self._one_by_one(stream, rows, columns, commands)
            return []
        codes = table.run_code[rows]
        runs = np.unique(codes)
        parts = []
        for code in runs.tolist():
            if runs.size == 1:
                group_rows, group = rows, columns
            else:
                mine = np.flatnonzero(codes == code)
                group_rows, group = rows[mine], columns.take(mine)
            parts.append(_Part(stream, group_rows, group, table.fresh(group_rows, group.seq)))
        return parts

    def _apply_run(self, group: list[_Part], out: dict[int, Commands]) -> None:
        """One run's parts (of one or more streams) as one batch, or one report at a time when it cannot be."""
        found: list[tuple[int, pb.Command]] | None = []
        fresh = [(p, p.rows[p.fresh]) for p in group if p.fresh.any()]
        if fresh:

            def gather(name: str) -> np.ndarray:
                return np.concatenate([getattr(p.stream.table, name)[r] for p, r in fresh])

            sessions, states, rank = gather("sessions"), gather("states"), gather("rank")
            columns = concat([p.columns.take(p.fresh) for p, _ in fresh])
            found = self._ingestor.apply_columns(sessions[0].run, rank, sessions, states, columns)
        if found is None:
            for part in group:
                self._one_by_one(part.stream, part.rows, part.columns, out[id(part.stream)])
            return
        by_rank: dict[int, Any] = {}
        for part in group:
            table = part.stream.table
            table.advance(part.rows, part.columns)
            table.applied_upto(part.rows[part.fresh], part.columns.seq[part.fresh])
            if not part.fresh.all():
                self._stats.duplicate(int((~part.fresh).sum()))
            if found:
                by_rank.update(dict.fromkeys(table.rank[part.rows].tolist(), part.stream))
        if found:
            first = group[0]
            run_id = first.stream.table.sessions[first.rows[0]].hello.run_id
            for number, command in found:
                out[id(by_rank.get(number, first.stream))].append((run_id, number, command))
