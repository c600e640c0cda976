"""Per-run silences: mute new pages for a run (optionally one detector) for a while.

Contract
--------
* `add(run, detector, duration_s, comment, created_by)` returns the new silence as a
  JSON-safe dict; ValueError on bad input (empty run, an unknown detector, a duration
  outside (0, MAX_DURATION_S]). `detector=None` silences every detector of the run.
* A silence is active from creation until `ends_at` or until `expire(id)`.
* `matching(run, detector)` lists the ids of active silences covering that alert.
* Silences mute notifications of alerts that have not been notified yet (see
  gradwatch.server.notify); the alerts themselves still fire, in /metrics and the API.
* Bounded: at most `max_active` active silences (ValueError beyond) and the last
  `history` expired ones.
* `adopt(record)` keeps a silence another replica created under its id and times (server/silences_api.py).
* Durable: with `persist`, every add and expire hands the active silences (as dicts) to it before
  returning, and `restore(dicts)` brings them back at start-up, so a restart does not unmute anything.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import threading
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

__all__ = ["MAX_DURATION_S", "SilenceBook"]

log = logging.getLogger(__name__)

MAX_DURATION_S = 7 * 24 * 3600.0
TEXT_CHARS = 1024


@dataclass
class _Silence:
    id: str
    run: str
    detector: str | None
    comment: str
    created_by: str
    created_at: float
    ends_at: float
    expired_at: float | None = None

    def active(self, now: float) -> bool:
        return self.expired_at is None and now < self.ends_at

    def as_dict(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "run": self.run,
            "detector": self.detector,
            "comment": self.comment,
            "created_by": self.created_by,
            "created_at": self.created_at,
            "ends_at": self.ends_at if self.expired_at is None else min(self.ends_at, self.expired_at),
            "state": "active" if self.active(now) else "expired",
        }


class SilenceBook:
    """Active and recently expired silences (see module docstring). Thread-safe."""

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        detectors: Collection[str],
        max_active: int = 1000,
        history: int = 100,
        persist: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> None:
        self._persist = persist
        self._clock = clock
        self._detectors = frozenset(detectors)
        self._max_active = max_active
        self._lock = threading.Lock()
        self._active: dict[str, _Silence] = {}
        self._expired: collections.deque[_Silence] = collections.deque(maxlen=history)
        self._ids = itertools.count(1)

    def add(
        self, run: str, detector: str | None, duration_s: float, comment: str = "", created_by: str = ""
    ) -> dict[str, Any]:
        """Create a silence; see the module docstring for what is rejected."""
        self._check(run, detector, comment, created_by)
        if isinstance(duration_s, bool) or not isinstance(duration_s, int | float):
            raise ValueError(f"duration_s must be a number, got {duration_s!r}")
        if not 0 < duration_s <= MAX_DURATION_S:
            raise ValueError(f"duration_s must be in (0, {MAX_DURATION_S:.0f}], got {duration_s!r}")
        with self._lock:
            now = self._room_locked()
            silence = _Silence(
                id=f"{next(self._ids)}-{uuid.uuid4().hex[:8]}",
                run=run,
                detector=detector,
                comment=comment[:TEXT_CHARS],
                created_by=created_by[:TEXT_CHARS],
                created_at=now,
                ends_at=now + float(duration_s),
            )
            self._active[silence.id] = silence
            self._save_locked(now)
            return silence.as_dict(now)

    def adopt(self, record: dict[str, Any]) -> dict[str, Any]:
        """Keep a silence another replica created (its `add` answer: id, run, detector, comment, created_by,
        created_at, ends_at) as it is, so that it mutes the run here too and an expiry by id reaches it. Checked
        like `add`; a known id changes nothing (returns it as held)."""
        sid, run, detector = record.get("id"), record.get("run"), record.get("detector")
        created_at, ends_at = record.get("created_at"), record.get("ends_at")
        comment, created_by = record.get("comment", ""), record.get("created_by", "")
        if not isinstance(sid, str) or not 0 < len(sid) <= 64 or not sid.isprintable() or "/" in sid:
            raise ValueError("id must be 1..64 printable characters without '/'")
        self._check(run, detector, comment, created_by)
        times = (created_at, ends_at)
        if any(isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) for t in times):
            raise ValueError("created_at and ends_at must be finite numbers")
        if not 0 < ends_at - created_at <= MAX_DURATION_S:  # type: ignore[operator]  # numbers, checked above
            raise ValueError(f"ends_at - created_at must be in (0, {MAX_DURATION_S:.0f}]")
        with self._lock:
            held = self._active.get(sid)
            if held is not None:
                return held.as_dict(self._clock())
            now = self._room_locked()
            silence = _Silence(id=sid, run=str(run), detector=detector, comment=comment[:TEXT_CHARS],
                               created_by=created_by[:TEXT_CHARS], created_at=float(created_at),  # type: ignore[arg-type]
                               ends_at=float(ends_at))  # type: ignore[arg-type]  # fmt: skip
            if silence.active(now):
                self._active[silence.id] = silence
                self._save_locked(now)
            return silence.as_dict(now)

    def _check(self, run: Any, detector: Any, comment: Any, created_by: Any) -> None:
        if not isinstance(run, str) or not run:
            raise ValueError("run must be a non-empty string")
        if detector is not None and detector not in self._detectors:
            raise ValueError(f"unknown detector {detector!r} (known: {', '.join(sorted(self._detectors))})")
        if not isinstance(comment, str) or not isinstance(created_by, str):
            raise ValueError("comment and created_by must be strings")

    def _room_locked(self) -> float:
        """Now, after expiring what ended; ValueError when no other silence fits."""
        now = self._clock()
        self._expire_locked(now)
        if len(self._active) >= self._max_active:
            raise ValueError(f"too many active silences ({self._max_active})")
        return now

    def expire(self, silence_id: str) -> dict[str, Any] | None:
        """End an active silence now; returns it, or None if there is no such active silence."""
        with self._lock:
            now = self._clock()
            silence = self._active.pop(silence_id, None)
            if silence is None:
                return None
            silence.expired_at = now
            self._expired.append(silence)
            self._save_locked(now)
            return silence.as_dict(now)

    def restore(self, saved: list[dict[str, Any]]) -> int:
        """Re-activate silences saved by `persist` that have not ended; returns how many."""
        with self._lock:
            now = self._clock()
            for item in saved[: self._max_active]:
                silence = _Silence(id=str(item["id"]), run=str(item["run"]), detector=item.get("detector"),
                                   comment=str(item.get("comment", "")), created_by=str(item.get("created_by", "")),
                                   created_at=float(item["created_at"]), ends_at=float(item["ends_at"]))  # fmt: skip
                if silence.active(now) and (silence.detector is None or silence.detector in self._detectors):
                    self._active[silence.id] = silence
            return len(self._active)

    def _save_locked(self, now: float) -> None:
        if self._persist is None:
            return
        try:
            self._persist([s.as_dict(now) for s in self._active.values()])
        except Exception:  # a full disk must not lose the silence in memory; the next change retries
            log.exception("could not store the silences")

    def view(self) -> list[dict[str, Any]]:
        """Active silences (oldest first), then expired ones (most recent first)."""
        with self._lock:
            now = self._clock()
            self._expire_locked(now)
            return [s.as_dict(now) for s in self._active.values()] + [s.as_dict(now) for s in reversed(self._expired)]

    def matching(self, run: str, detector: str) -> list[str]:
        """Ids of active silences that cover (run, detector)."""
        with self._lock:
            now = self._clock()
            self._expire_locked(now)
            return [
                s.id for s in self._active.values() if s.run == run and (s.detector is None or s.detector == detector)
            ]

    def active_count(self) -> int:
        with self._lock:
            self._expire_locked(self._clock())
            return len(self._active)

    def _expire_locked(self, now: float) -> None:
        for sid in [sid for sid, s in self._active.items() if not s.active(now)]:
            self._expired.append(self._active.pop(sid))
