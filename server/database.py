"""The embedded SQLite database: run registry, alerts and incidents that survive a restart.

Contract
--------
* One file, `<data_dir>/gradwatch.db` (WAL journal, synchronous=NORMAL: a committed
  write survives the process being killed; only a power loss can take the last ones).
  An empty `data_dir` keeps the database in memory (embedded servers, tests).
* Writes happen when state changes, before the frame that caused them is acknowledged:
  a run's Hello, an alert's fire and resolve transitions, an incident opening and
  closing. Progress (a run's latest step, the ranks of a firing alert) is checkpointed
  by the app every sweep.
* A run's ranks (their API views, one row each, rewritten when more than their moving fields changed; those are
  the run's `latest` part), each rank's report ring (the rows appended since the
  previous checkpoint, one chunk per rank and checkpoint, numbered by the rank's report count) and its
  per-layer aggregates and global gradient norms (`run_parts`) are written by `checkpoint()`, so a restored
  run answers /api/v1 and /metrics as before the restart (gradwatch.server.persistence).
* Incident windows are stored as one compressed numpy archive (`.npz` bytes) per
  incident, never as per-layer rows. JSON bodies are strict (no NaN).
* Retention: `prune()` deletes incidents older than `incident_retention_s`, then the
  oldest beyond `max_incidents` or `max_incident_bytes`, runs unseen for
  `run_retention_s` or beyond `max_runs` (with their ranks, series and parts), series chunks older than the
  latest `series_rows` reports of their rank, and resolved alerts beyond `alert_history`;
  what it deleted is counted in `pruned` by (table, reason).
* Thread-safe: one connection guarded by one lock (reads are short).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradwatch.server.alerts import Alert
from gradwatch.server.config import StorageConfig

__all__ = ["DB_FILE", "MAX_CANDIDATES", "SCHEMA_VERSION", "AmbiguousIncident", "Checkpoint", "Database"]

DB_FILE = "gradwatch.db"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, job_name TEXT NOT NULL, world_size INTEGER NOT NULL,
    first_seen REAL NOT NULL, last_seen REAL NOT NULL, finished_at REAL,
    protocol_version INTEGER NOT NULL, summary TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS runs_last_seen ON runs (last_seen);
CREATE TABLE IF NOT EXISTS alerts (
    id TEXT NOT NULL, started_at REAL NOT NULL, run_id TEXT NOT NULL, detector TEXT NOT NULL,
    state TEXT NOT NULL, resolved_at REAL, body TEXT NOT NULL, PRIMARY KEY (id, started_at));
CREATE INDEX IF NOT EXISTS alerts_state ON alerts (state, started_at);
CREATE TABLE IF NOT EXISTS incidents (
    id TEXT PRIMARY KEY, run_id TEXT NOT NULL, detector TEXT NOT NULL, severity TEXT NOT NULL,
    alert_id TEXT NOT NULL, step INTEGER NOT NULL, opened_at REAL NOT NULL, status TEXT NOT NULL,
    body TEXT NOT NULL, window BLOB NOT NULL, window_bytes INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS incidents_opened ON incidents (opened_at);
CREATE TABLE IF NOT EXISTS ranks (
    run_id TEXT NOT NULL, rank INTEGER NOT NULL, view TEXT NOT NULL, PRIMARY KEY (run_id, rank));
CREATE TABLE IF NOT EXISTS series (
    run_id TEXT NOT NULL, rank INTEGER NOT NULL, start INTEGER NOT NULL, stop INTEGER NOT NULL, rows BLOB NOT NULL,
    PRIMARY KEY (run_id, rank, start));
CREATE INDEX IF NOT EXISTS series_stop ON series (run_id, rank, stop);
CREATE TABLE IF NOT EXISTS run_parts (
    run_id TEXT NOT NULL, part TEXT NOT NULL, body BLOB NOT NULL, PRIMARY KEY (run_id, part));
"""

_PUT_RUN = (
    "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run_id) DO UPDATE SET "
    "job_name=excluded.job_name, world_size=excluded.world_size, last_seen=excluded.last_seen, "
    "finished_at=excluded.finished_at, protocol_version=excluded.protocol_version, summary=excluded.summary"
)
_RUN_KEYS = ("run_id", "job_name", "world_size", "first_seen", "last_seen", "finished_at", "protocol_version")
_RUN_COLUMNS = ", ".join((*_RUN_KEYS, "summary"))
#: Columns of an incident summary (list views); the body holds everything else.
_SUMMARY = "id, run_id, detector, severity, alert_id, step, opened_at, status, window_bytes, body"


#: Incident ids an ambiguous prefix lists (enough to choose from; the list of incidents has the rest).
MAX_CANDIDATES = 10


class AmbiguousIncident(LookupError):
    """An id prefix that matches more than one incident: `candidates` are (up to MAX_CANDIDATES of) their ids."""

    def __init__(self, prefix: str, candidates: list[str]) -> None:
        super().__init__(prefix, candidates)
        self.prefix = prefix
        self.candidates = candidates


@dataclass
class Checkpoint:
    """What one checkpoint writes (Database.checkpoint)."""

    runs: list[dict[str, Any]] = field(default_factory=list)  # as put_run takes them
    ranks: list[tuple[str, int, dict[str, Any]]] = field(default_factory=list)  # (run, rank, {view, sessions})
    series: list[tuple[str, int, int, int, bytes]] = field(default_factory=list)  # (run, rank, start, stop, rows)
    parts: list[tuple[str, str, bytes]] = field(default_factory=list)  # (run, part, body)
    forget: list[str] = field(default_factory=list)  # runs whose saved rank rows are dropped first

    def __bool__(self) -> bool:
        return bool(self.runs or self.ranks or self.series or self.parts or self.forget)


class Database:
    """See the module docstring."""

    def __init__(self, config: StorageConfig, *, alert_history: int, clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._alert_history = alert_history
        self._clock = clock
        if config.data_dir:
            directory = Path(config.data_dir)
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ValueError(f"storage.data_dir: cannot create {str(directory)!r}: {exc.strerror or exc}") from None
            self.path: str = str(directory / DB_FILE)
        else:
            self.path = ":memory:"
        try:
            self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise ValueError(f"storage.data_dir: cannot open database {self.path!r}: {exc}") from None
        self._lock = threading.Lock()
        self._check_version()
        #: (table, reason) -> rows deleted by prune() since start.
        self.pruned: dict[tuple[str, str], int] = {}
        #: Failed writes since start (a full disk must not stop ingestion; counted and logged by the caller).
        self.write_errors = 0

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @property
    def persistent(self) -> bool:
        return self.path != ":memory:"

    # ------------------------------------------------------------------ runs

    def put_run(self, run: dict[str, Any]) -> None:
        """Insert or update a run: keys run_id, job_name, world_size, first_seen, last_seen, finished_at,
        protocol_version, and `summary` (a JSON-safe dict: latest step, ranks...)."""
        self.put_runs([run])

    def put_runs(self, runs: list[dict[str, Any]]) -> None:
        """`put_run` for many runs in one transaction (the checkpoint)."""
        rows = [
            (
                run["run_id"],
                run["job_name"],
                run["world_size"],
                run["first_seen"],
                run["last_seen"],
                run["finished_at"],
                run["protocol_version"],
                _dumps(run["summary"]),
            )
            for run in runs
        ]
        with self._lock, self._transaction():
            self._conn.executemany(_PUT_RUN, rows)

    def checkpoint(self, c: Checkpoint) -> None:
        """Write one checkpoint in one transaction: `forget` runs' rank rows go first (a restored run whose
        agents are back lists only the ranks that came back), then runs, rank views, series chunks and parts."""
        runs = [
            (r["run_id"], r["job_name"], r["world_size"], r["first_seen"], r["last_seen"], r["finished_at"],
             r["protocol_version"], _dumps(r["summary"]))
            for r in c.runs
        ]  # fmt: skip
        with self._lock, self._transaction():
            self._conn.executemany("DELETE FROM ranks WHERE run_id = ?", [(run,) for run in c.forget])
            self._conn.executemany(_PUT_RUN, runs)
            self._conn.executemany(
                "INSERT OR REPLACE INTO ranks VALUES (?, ?, ?)", [(run, rank, _dumps(v)) for run, rank, v in c.ranks]
            )
            self._conn.executemany("INSERT OR REPLACE INTO series VALUES (?, ?, ?, ?, ?)", c.series)
            self._conn.executemany("INSERT OR REPLACE INTO run_parts VALUES (?, ?, ?)", c.parts)

    def run_ranks(self, run_id: str) -> list[dict[str, Any]]:
        """The saved ranks of a run, by rank: {"view": its API view, "sessions": [[session id, seq], ...]}."""
        rows = self._read("SELECT view FROM ranks WHERE run_id = ? ORDER BY rank", (run_id,))
        return [json.loads(row[0]) for row in rows]

    def run_series(self, run_id: str) -> dict[int, list[tuple[int, int, bytes]]]:
        """rank -> its saved series chunks (start, stop, rows), oldest first."""
        rows = self._read("SELECT rank, start, stop, rows FROM series WHERE run_id = ? ORDER BY rank, start", (run_id,))
        chunks: dict[int, list[tuple[int, int, bytes]]] = {}
        for rank, start, stop, data in rows:
            chunks.setdefault(int(rank), []).append((int(start), int(stop), bytes(data)))
        return chunks

    def run_parts(self, run_id: str) -> dict[str, bytes]:
        return {part: bytes(body) for part, body in self._read("SELECT part, body FROM run_parts WHERE run_id = ?",
                                                               (run_id,))}  # fmt: skip

    def runs(self, limit: int) -> list[dict[str, Any]]:
        """The `limit` most recently seen runs, least recent first."""
        rows = self._read(f"SELECT {_RUN_COLUMNS} FROM runs ORDER BY last_seen DESC LIMIT ?", (limit,))
        return [_run(row) for row in reversed(rows)]

    def run(self, run_id: str) -> dict[str, Any] | None:
        rows = self._read(f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = ?", (run_id,))
        return _run(rows[0]) if rows else None

    # ------------------------------------------------------------------ alerts

    def put_alert(self, alert: Alert) -> None:
        """Insert or update one alert occurrence (identity: id and started_at); the body is its JSON form and
        the ranks still firing."""
        self._write(
            "INSERT INTO alerts VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id, started_at) DO UPDATE SET "
            "state=excluded.state, resolved_at=excluded.resolved_at, body=excluded.body",
            (
                alert.id,
                alert.started_at,
                alert.run,
                alert.detector,
                alert.state,
                alert.resolved_at,
                _dumps({**alert.to_json(), "active": list(alert.active)}),
            ),
        )

    def alerts(self, state: str) -> list[Alert]:
        """Alerts in `state`, oldest first."""
        rows = self._read("SELECT body FROM alerts WHERE state = ? ORDER BY started_at", (state,))
        return [Alert.from_json(json.loads(row[0])) for row in rows]

    # ------------------------------------------------------------------ incidents

    def put_incident(self, incident: dict[str, Any], window: bytes) -> None:
        """Insert or replace an incident (its JSON body) and its window archive."""
        self._write(
            "INSERT OR REPLACE INTO incidents VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                incident["id"],
                incident["run"],
                incident["detector"],
                incident["severity"],
                incident["alert_id"],
                incident["step"],
                incident["opened_at"],
                incident["status"],
                _dumps(incident),
                window,
                len(window),
            ),
        )

    def interrupt_recording(self) -> int:
        """Mark incidents still `recording` (the server stopped before their reports after the alert arrived)
        as `interrupted`; called at start-up. Returns how many."""
        with self._lock:
            return int(
                self._conn.execute(
                    "UPDATE incidents SET status = 'interrupted', body = json_set(body, '$.status', 'interrupted') "
                    "WHERE status = 'recording'"
                ).rowcount
            )

    def incidents(
        self,
        *,
        run: str | None = None,
        detector: str | None = None,
        severity: str | None = None,
        since: float | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[list[dict[str, Any]], int]:
        """Incident summaries, newest first, filtered; and the total count matching the filters."""
        where: list[str] = []
        args: list[Any] = []
        for column, value in (("run_id", run), ("detector", detector), ("severity", severity)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if since is not None:
            where.append("opened_at >= ?")
            args.append(since)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        total = self._read(f"SELECT COUNT(*) FROM incidents{clause}", tuple(args))[0][0]
        rows = self._read(
            f"SELECT {_SUMMARY} FROM incidents{clause} ORDER BY opened_at DESC, id LIMIT ? OFFSET ?",
            (*args, limit, offset),
        )
        return [_summary(row) for row in rows], int(total)

    def incident(self, incident_id: str) -> dict[str, Any] | None:
        """The full incident body, by id or by an unambiguous id prefix (≥ 4 characters); AmbiguousIncident when
        the prefix matches several."""
        row = self._incident_row(incident_id, "body")
        return None if row is None else json.loads(row[0])

    def incident_window(self, incident_id: str) -> bytes | None:
        row = self._incident_row(incident_id, "window")
        return None if row is None else bytes(row[0])

    def _incident_row(self, incident_id: str, column: str) -> tuple[Any, ...] | None:
        rows = self._read(f"SELECT {column} FROM incidents WHERE id = ?", (incident_id,))
        if not rows and len(incident_id) >= 4:
            pattern = incident_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            rows = self._read(
                f"SELECT id, {column} FROM incidents WHERE id LIKE ? ESCAPE '\\' ORDER BY id LIMIT ?",
                (pattern, MAX_CANDIDATES + 1),
            )
            if len(rows) > 1:
                raise AmbiguousIncident(incident_id, [row[0] for row in rows[:MAX_CANDIDATES]])
            return rows[0][1:] if rows else None
        return rows[0] if rows else None

    # ------------------------------------------------------------------ retention

    def prune(
        self, *, keep_runs: frozenset[str] = frozenset(), series_rows: int = 1 << 16
    ) -> dict[tuple[str, str], int]:
        """Apply the retention limits now; returns what this call deleted by (table, reason).

        `keep_runs` (runs the server still tracks) are never pruned from the registry; `series_rows`: reports
        kept per rank (limits.ring_length: what a rank's ring holds).
        """
        cfg, now = self._config, self._clock()
        deleted: dict[tuple[str, str], int] = {}

        def note(table: str, reason: str, count: int) -> None:
            if count > 0:
                deleted[(table, reason)] = deleted.get((table, reason), 0) + count
                self.pruned[(table, reason)] = self.pruned.get((table, reason), 0) + count

        with self._lock, self._transaction():
            c = self._conn
            note(
                "incidents",
                "age",
                c.execute("DELETE FROM incidents WHERE opened_at < ?", (now - cfg.incident_retention_s,)).rowcount,
            )
            note(
                "incidents",
                "count",
                c.execute(
                    "DELETE FROM incidents WHERE id IN "
                    "(SELECT id FROM incidents ORDER BY opened_at DESC LIMIT -1 OFFSET ?)",
                    (cfg.max_incidents,),
                ).rowcount,
            )
            # Oldest first until the stored windows fit: the running sum from the newest down.
            note(
                "incidents",
                "size",
                c.execute(
                    "DELETE FROM incidents WHERE id IN (SELECT id FROM (SELECT id, SUM(window_bytes) OVER "
                    "(ORDER BY opened_at DESC, id ROWS UNBOUNDED PRECEDING) AS total FROM incidents) WHERE total > ?)",
                    (cfg.max_incident_bytes,),
                ).rowcount,
            )
            keep = tuple(keep_runs)
            marks = ",".join("?" * len(keep))
            spare = f" AND run_id NOT IN ({marks})" if keep else ""
            note(
                "runs",
                "age",
                c.execute(f"DELETE FROM runs WHERE last_seen < ?{spare}", (now - cfg.run_retention_s, *keep)).rowcount,
            )
            note(
                "runs",
                "count",
                c.execute(
                    f"DELETE FROM runs WHERE run_id IN (SELECT run_id FROM runs ORDER BY last_seen DESC "
                    f"LIMIT -1 OFFSET ?){spare}",
                    (cfg.max_runs, *keep),
                ).rowcount,
            )
            for table in ("ranks", "series", "run_parts"):
                orphans = c.execute(f"DELETE FROM {table} WHERE run_id NOT IN (SELECT run_id FROM runs)")
                note(table, "run_pruned", orphans.rowcount)
            note(
                "series",
                "count",
                c.execute(
                    "DELETE FROM series WHERE stop <= (SELECT MAX(s.stop) FROM series s "
                    "WHERE s.run_id = series.run_id AND s.rank = series.rank) - ?",
                    (series_rows,),
                ).rowcount,
            )
            note(
                "alerts",
                "run_pruned",
                c.execute(
                    "DELETE FROM alerts WHERE state = 'resolved' AND run_id NOT IN (SELECT run_id FROM runs)"
                ).rowcount,
            )
            note(
                "alerts",
                "count",
                c.execute(
                    "DELETE FROM alerts WHERE rowid IN (SELECT rowid FROM alerts WHERE state = 'resolved' "
                    "ORDER BY resolved_at DESC LIMIT -1 OFFSET ?)",
                    (self._alert_history,),
                ).rowcount,
            )
        return deleted

    def stored_bytes(self) -> int:
        return int(self._read("SELECT COALESCE(SUM(window_bytes), 0) FROM incidents", ())[0][0])

    # ------------------------------------------------------------------ silences

    def put_silences(self, silences: list[dict[str, Any]]) -> None:
        """Replace the stored active silences (a bounded list: SilenceBook's max_active)."""
        self._write("INSERT OR REPLACE INTO meta VALUES ('silences', ?)", (_dumps(silences),))

    def silences(self) -> list[dict[str, Any]]:
        """The active silences stored by `put_silences` ([] if none)."""
        rows = self._read("SELECT value FROM meta WHERE key = 'silences'", ())
        return list(json.loads(rows[0][0])) if rows else []

    def counts(self) -> dict[str, int]:
        """Rows per table."""
        return {t: int(self._read(f"SELECT COUNT(*) FROM {t}", ())[0][0]) for t in ("runs", "alerts", "incidents")}

    # ------------------------------------------------------------------ internals

    def _check_version(self) -> None:
        rows = self._read("SELECT value FROM meta WHERE key = 'schema_version'", ())
        if not rows:
            self._write("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(rows[0][0]) != SCHEMA_VERSION:
            raise ValueError(
                f"storage.data_dir: {self.path} has schema version {rows[0][0]}, this server reads {SCHEMA_VERSION}"
            )

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def _write(self, sql: str, args: tuple[Any, ...]) -> None:
        with self._lock:
            self._conn.execute(sql, args)

    def _read(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()


def _dumps(value: Any) -> str:
    return json.dumps(value, allow_nan=False, separators=(",", ":"))


def _run(row: tuple[Any, ...]) -> dict[str, Any]:
    return {**dict(zip(_RUN_KEYS, row[:7], strict=True)), "summary": json.loads(row[7])}


def _summary(row: tuple[Any, ...]) -> dict[str, Any]:
    body = json.loads(row[9])
    return {
        "id": row[0],
        "run": row[1],
        "detector": row[2],
        "severity": row[3],
        "alert_id": row[4],
        "step": row[5],
        "opened_at": row[6],
        "status": row[7],
        "window_bytes": row[8],
        "layer": body.get("layer"),
        "summary": body.get("summary", ""),
        "ranks": body.get("ranks_firing", []),
        "steps": body.get("window", {}).get("steps"),
    }
