"""What the activation, input and output detectors share: which modules to judge, and per-rank hysteresis.

`Hysteresis` keeps, per rank, a streak counter per module (a numpy array, updated without a Python loop per
module). A detector hands it, for each report it can judge, three arrays indexed like the report's modules:
`over` (the fire threshold is crossed), `still` (the looser clear threshold is still crossed) and `score`
(how bad; the worst module is the one an alert names). The rule:

* the first `min_reports` judged reports of a rank only warm up (no streaks);
* a module crossing the fire threshold on `consecutive` judged reports in a row starts the alert;
* while firing, every report where some module is still past the clear threshold fires again (the alert
  follows the worst module), and `resolve_after` judged reports in a row with none past it clear the rank.

Two thresholds and a minimum duration mean one noisy batch neither pages nor ends a page.

`Latch` is the same rule, per rank, for detectors that make one yes/no judgement per report (loss, gradient,
update and non-finite detectors): `consecutive` abnormal reports in a row fire, every report still abnormal
fires again, `resolve_after` normal reports in a row clear. `Hysteresis` keeps its firing state in one.

`ACTIVATION_TYPES` names the module types the agent watches as activation functions (one list for both
sides, gradwatch.v1.vocabulary, as names because the server never imports torch); `output_module_mask`
marks the module whose output is most likely the model's (the last one in the schema): a classifier's final
Sigmoid is meant to saturate and need not be centred, so detectors of hidden activations leave it out.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from gradwatch.v1.vocabulary import ACTIVATION_MODULE_TYPES

__all__ = [
    "ACTIVATION_TYPES",
    "BOUNDED_TYPES",
    "CLEAR",
    "FIRE",
    "RELU_TYPES",
    "Hysteresis",
    "Latch",
    "Outcome",
    "hidden_activation_mask",
    "output_module_mask",
    "type_mask",
]

#: Module types the agent's forward hooks watch as activations (the classes of agent.activations.ACTIVATION_TYPES).
ACTIVATION_TYPES: tuple[str, ...] = ACTIVATION_MODULE_TYPES
#: Activations whose units can die: zero output and zero gradient for every negative input.
RELU_TYPES: tuple[str, ...] = ("ReLU", "ReLU6")
#: Activations with a bounded range, for which the agent reports a saturated fraction.
BOUNDED_TYPES: tuple[str, ...] = ("Sigmoid", "Tanh", "Hardtanh", "Hardsigmoid", "Softsign", "ReLU6")

#: Distinct (schema, types) masks kept (a run has one schema or a few; each mask is one bool per module).
MASKS_CACHED = 256

FIRE = "fire"
CLEAR = "clear"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What `Hysteresis.judge` decided: FIRE naming module `index`, or CLEAR (index -1)."""

    kind: str
    index: int = -1


@functools.lru_cache(maxsize=MASKS_CACHED)
def type_mask(module_types: tuple[str, ...], types: tuple[str, ...]) -> np.ndarray:
    """Boolean mask of the modules whose type is one of `types` (read-only; cached per schema: every report of
    a stream shares its module_types tuple, so this is a dictionary lookup instead of a string comparison per
    module and report)."""
    mask = np.isin(np.asarray(module_types, dtype=object), types)
    mask.flags.writeable = False
    return mask


def output_module_mask(count: int) -> np.ndarray:
    """True for the last module of the schema (taken as the model's output), False elsewhere."""
    mask = np.zeros(count, dtype=bool)
    if count:
        mask[-1] = True
    return mask


@functools.lru_cache(maxsize=MASKS_CACHED)
def hidden_activation_mask(module_types: tuple[str, ...], types: tuple[str, ...] = ACTIVATION_TYPES) -> np.ndarray:
    """Activation modules of `types`, except the model's output module (read-only, cached like type_mask)."""
    mask = type_mask(module_types, types) & ~output_module_mask(len(module_types))
    mask.flags.writeable = False
    return mask


@dataclass(slots=True)
class _Streaks:
    over: int = 0
    calm: int = 0
    firing: bool = False


class Latch:
    """Per-rank fire/clear state machine for one yes/no judgement per report (see the module docstring)."""

    def __init__(self, *, resolve_after: int, consecutive: int = 1) -> None:
        self._consecutive = consecutive
        self._resolve_after = resolve_after
        self._ranks: dict[int, _Streaks] = {}

    def firing(self, rank: int) -> bool:
        state = self._ranks.get(rank)
        return state is not None and state.firing

    def forget(self, rank: int) -> None:
        """`rank` starts again (Detector.forget)."""
        self._ranks.pop(rank, None)

    def at_rest(self, rank: int) -> bool:
        """`judge(rank, False)` would change nothing, as `judge(rank, None)` does: `rank` is not firing and has no
        streak. A caller may then skip a costly test that only decides between those two."""
        state = self._ranks.get(rank)
        return state is None or not (state.firing or state.over)

    def judge(self, rank: int, over: bool | None, *, still: bool | None = None, now: bool = False) -> str | None:
        """One report of `rank`: FIRE, CLEAR or None.

        `over`: the fire condition holds (None: the report lies between the fire and clear conditions and
        changes nothing); `still`: the rank is still abnormal, judged while firing (default: `over`); `now`:
        fire at once, whatever the streak of `over`.
        """
        if over is None:
            return None
        state = self._ranks.get(rank)
        if state is None:
            state = self._ranks[rank] = _Streaks()
        state.over = state.over + 1 if over else 0
        if state.firing:
            if over if still is None else still:
                state.calm = 0
                return FIRE
            state.calm += 1
            if state.calm >= self._resolve_after:
                state.firing = False
                state.calm = 0
                state.over = 0
                return CLEAR
            return None
        if now or state.over >= self._consecutive:
            state.firing = True
            state.calm = 0
            return FIRE
        return None


@dataclass
class _RankState:
    streak: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    judged: int = 0


class Hysteresis:
    """Per-rank, per-module fire/clear state machine (see the module docstring)."""

    def __init__(self, *, consecutive: int, resolve_after: int, min_reports: int = 0) -> None:
        self._consecutive = consecutive
        self._min_reports = min_reports
        self._latch = Latch(resolve_after=resolve_after)
        self._ranks: dict[int, _RankState] = {}

    def firing(self, rank: int) -> bool:
        return self._latch.firing(rank)

    def forget(self, rank: int) -> None:
        """`rank` starts again (Detector.forget)."""
        self._latch.forget(rank)
        self._ranks.pop(rank, None)

    def judged(self, rank: int) -> int:
        """Reports of `rank` judged so far."""
        state = self._ranks.get(rank)
        return 0 if state is None else state.judged

    def judge(self, rank: int, over: np.ndarray, still: np.ndarray, score: np.ndarray) -> Outcome | None:
        """One judged report of `rank`; the arrays are indexed by module (all of one length)."""
        state = self._ranks.get(rank)
        if state is None:
            state = self._ranks[rank] = _RankState()
        if state.streak.shape != over.shape:  # a new schema (a restarted agent): streaks start again
            state.streak = np.zeros(over.shape, dtype=np.int64)
        state.judged += 1
        firing = self._latch.firing(rank)
        if state.judged <= self._min_reports and not firing:
            return None
        ready = None
        if not self._quiet(state.streak, over):
            state.streak = np.where(over, state.streak + 1, 0)
            ready = state.streak >= self._consecutive
        kind = self._latch.judge(rank, ready is not None and bool(ready.any()), still=bool(still.any()))
        if kind == CLEAR:
            state.streak[:] = 0
            return Outcome(CLEAR)
        if kind == FIRE:  # the worst module still past the clear threshold, or ready to fire
            chosen = still if firing else ready
            assert chosen is not None  # (not firing before: it fired because a module was ready)
            worst = np.where(np.isfinite(score), score, np.inf)
            return Outcome(FIRE, int(np.argmax(np.where(chosen, worst, -np.inf))))
        return None

    def _quiet(self, streak: np.ndarray, over: np.ndarray) -> bool:
        """No module is over now and none was on a streak (most reports): the streaks stay zero and no module is
        ready, so they need not be recomputed."""
        return self._consecutive > 0 and not over.any() and not streak.any()
