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
* `reconcile(records)` brings this book in line with another replica's listing (the resync of
  server/silences_api.py): an active silence unknown here is adopted, one expired there early (before its
  `ends_at`) that is active here is expired here at the same time. An id expired early here is remembered until
  its own `ends_at` (at most `max_active` such ids), so a stale active copy elsewhere never brings it back:
  the expiry, a deliberate act, wins over the creation.
* Durable: with `persist`, every add and expire hands the active silences and the remembered early expiries (as
  dicts) to it before returning, and `restore(dicts)` brings them back at start-up, so a restart neither unmutes
  anything nor forgets an expiry.
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

    def ended_early(self, now: float) -> bool:
        """Expired by someone before its own end, which has not come yet (remembered so it stays expired)."""
        return self.expired_at is not None and self.expired_at < self.ends_at and now < self.ends_at

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
        #: Silences expired early whose own end has not come: id -> silence (oldest expiry first).
        self._ended: dict[str, _Silence] = {}
        self._ids = itertools.count(1)
        #: What reconcile changed here: {"adopted": n, "expired": n, "refused": n}.
        self.synced: collections.Counter[str] = collections.Counter()

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
            held = self._active.get(sid) or self._ended.get(sid)
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
            if silence_id not in self._active:
                return None
            silence = self._end_locked(silence_id, now)
            self._save_locked(now)
            return silence.as_dict(now)

    def _end_locked(self, silence_id: str, at: float) -> _Silence:
        silence = self._active.pop(silence_id)
        silence.expired_at = at
        self._expired.append(silence)
        if silence.ended_early(at):
            self._ended[silence_id] = silence
            while len(self._ended) > self._max_active:  # the oldest expiry goes first
                del self._ended[next(iter(self._ended))]
        return silence

    def reconcile(self, records: list[dict[str, Any]]) -> dict[str, int]:
        """Bring this book in line with another replica's listing (see the module docstring); returns what it
        changed here: {"adopted": n, "expired": n, "refused": n} (refused: records `adopt` would not take)."""
        changed = {"adopted": 0, "expired": 0, "refused": 0}
        # Creations first: a silence adopted from one replica's listing and expired early in another's ends
        # expired here, whatever order the listings came in.
        for record in sorted(records, key=lambda r: r.get("state") != "active"):
            sid, state, end = record.get("id"), record.get("state"), record.get("ends_at")
            if state == "active" and isinstance(sid, str):
                with self._lock:
                    known = sid in self._active or sid in self._ended or any(s.id == sid for s in self._expired)
                if known:
                    continue
                try:
                    self.adopt({key: record[key] for key in _RECORD if key in record})
                except ValueError as exc:
                    log.warning("a peer's silence %r was refused: %s", sid, exc)
                    changed["refused"] += 1
                    continue
                changed["adopted"] += 1
            elif state == "expired" and isinstance(sid, str) and isinstance(end, int | float) and math.isfinite(end):
                with self._lock:
                    now = self._clock()
                    held = self._active.get(sid)
                    if held is None or not end < held.ends_at:  # not held, or it ended on time there too
                        continue
                    self._end_locked(sid, min(float(end), now))
                    self._save_locked(now)
                changed["expired"] += 1
        self.synced.update(changed)
        return changed

    def restore(self, saved: list[dict[str, Any]]) -> int:
        """Re-activate silences saved by `persist` that have not ended, and remember the early expiries saved
        with them; returns how many are active."""
        with self._lock:
            now = self._clock()
            for item in saved[: 2 * self._max_active]:
                silence = _Silence(id=str(item["id"]), run=str(item["run"]), detector=item.get("detector"),
                                   comment=str(item.get("comment", "")), created_by=str(item.get("created_by", "")),
                                   created_at=float(item["created_at"]), ends_at=float(item["ends_at"]),
                                   expired_at=_number_or_none(item.get("expired_at")))  # fmt: skip
                if silence.detector is not None and silence.detector not in self._detectors:
                    continue
                if silence.active(now) and len(self._active) < self._max_active:
                    self._active[silence.id] = silence
                elif silence.ended_early(now) and len(self._ended) < self._max_active:
                    self._ended[silence.id] = silence
                    self._expired.append(silence)
            return len(self._active)

    def _save_locked(self, now: float) -> None:
        if self._persist is None:
            return
        self._forget_ended_locked(now)
        ended = [{**s.as_dict(now), "ends_at": s.ends_at, "expired_at": s.expired_at} for s in self._ended.values()]
        try:
            self._persist([s.as_dict(now) for s in self._active.values()] + ended)
        except Exception:  # a full disk must not lose the silence in memory; the next change retries
            log.exception("could not store the silences")

    def _forget_ended_locked(self, now: float) -> None:
        for sid in [sid for sid, s in self._ended.items() if not s.ended_early(now)]:
            del self._ended[sid]

    def view(self) -> list[dict[str, Any]]:
        """Active silences (oldest first), then expired ones (most recent first; the early expiries whose own
        end has not come are all listed, even beyond `history`, so that every replica learns of them)."""
        with self._lock:
            now = self._clock()
            self._expire_locked(now)
            self._forget_ended_locked(now)
            recent = list(reversed(self._expired))
            listed = {s.id for s in recent}
            older = [s for s in reversed(self._ended.values()) if s.id not in listed]
            return [s.as_dict(now) for s in [*self._active.values(), *recent, *older]]

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


_RECORD = ("id", "run", "detector", "comment", "created_by", "created_at", "ends_at")


def _number_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
