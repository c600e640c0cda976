"""rank_divergence: one rank's loss far from the other ranks' at the same step, sustained.

Rationale
---------
Data-parallel ranks train one model on different slices of the same data, so their
losses at a step scatter around a common value. A rank whose loss sits far outside
that scatter step after step is seeing different data (a corrupted shard, a broken
augmentation, wrong labels, a preprocessing bug on one host) or computing differently
(a faulty device); averaged into the global gradient it degrades the model quietly,
and rank 0's logs never show it. Once every rank has reported a step, each rank's
loss gets a robust z-score across ranks:

    z = (loss − median) / max(1.4826 × MAD, rel_floor × |median|, abs_floor)

Median and MAD are not moved by the outlier itself; the floors stop ranks whose losses
happen to agree closely (MAD ≈ 0) from making ordinary noise look extreme. A rank
fires after `consecutive` complete steps in a row with |z| > z_threshold and clears
after `resolve_after` steps back inside. At least `min_ranks` ranks (3: with two,
neither is "the odd one out") with a finite loss are needed.

A cross-rank z-score needs a majority: with two ranks, or with four ranks of which two
went bad, the median sits between the groups and nobody is "far". So a second rule, the
**contrast** rule, needs none. At each complete step every rank's contrast is its loss
minus the median of the other ranks' losses (with two ranks: the other's loss). The
ranks train one model on batches of one distribution, so a rank's contrast is stationary
noise around a constant (0, or a fixed offset when its shard is harder by design)
whatever the loss itself does: training lowering every loss, a schedule, a shared hard
stretch or a learning-rate jump move all ranks together and cancel. Each rank keeps a
robust baseline of its own admitted contrasts (`own_window`, after `own_min_steps` of
warm-up; the newest `contrast_steps` admissions are left out, so a departure's first
steps do not move it): median m, and sigma, the larger of 1.4826 × their MAD and the
sigma its contrast would have now if it were like the others: the other ranks' median
batch noise, each rank's from the consecutive differences of its last 10 and last 5
losses (the larger; a level shift moves one difference), held while it falls by at most
20 % a step (an estimate from a few differences scatters, and a low draw just after the
noise grew must not stand for it), scaled for the comparison with their median. A model
leaving chance starts to tell its batches apart and every rank gets noisier at once; a
corrupted rank's own noisier losses must not hide its shift. A rank departs when the
median of its last `contrast_steps` contrasts (at least half of them present: a missing
loss here and there does not blind the rule) is

    above m by more than contrast_threshold standard errors of that median
        (1.2533 × sigma / √contrast_steps: sustained, not one hard batch),
    and by at least min_shift × its starting loss level (a difference that matters at
        the task's scale, not noise near a zero loss),

and its own loss rose, by at least half that shift and by half that shift more than the
other ranks' median rise (each rank's rise: the median of its last `contrast_steps` losses
over the median of the 10 before them). A contrast also grows when the *other* rank's
loss falls, and every rank rising together against a stale baseline moves nobody's rise
apart: neither blames a rank. A departing rank fires at once (the median already asks for
most of the last `contrast_steps` steps), whatever the world size or the majority. Only
rises count. Contrasts of a departing or firing rank, and single contrasts 3 sigmas out,
are not admitted; a rank kept out of its baseline for `own_min_steps` steps in a row
without departing has a new usual contrast (its partner's loss fell for good, a bad rank
was fixed, shards changed) and its baseline starts again, as every rank's does when ranks
join (each contrast then compares with another median). Once firing, a rank stays firing
while either rule holds and clears after `resolve_after` judged complete steps with
neither (a step without its contrast neither counts nor resets). A bad rank's gradients
degrade the shared model, so the healthy ranks' losses rise too, later and less: their
contrasts fall as the bad rank's rose. One shape stays wrong: a corrupted rank whose
first batch wrecks the shared model (a loss of 17, then every rank far off) can leave
the healthy ranks' losses above its own; they may then be named instead (loss_spike names
the corrupted rank at its first batch).

Why 5.5 standard errors: the sigma is itself estimated, and a rule judged on every step
of a long job must not fire on its errors. Simulated healthy ranks (a falling loss, normal
noise): 4 ranks × 40,000 steps and 2 ranks × 60,000 started no alert (an earlier form of
the rule at 5.0 started one on 4 ranks × 50,000). Healthy ranks whose noise grows fourfold
over 10 steps (a model leaving chance), 100 runs each of 5 shapes of 2–4 ranks: 1 of the
500 started an alert. On the matrix's tuning seeds (5000–5159: 72 runs of 2–4 ranks, each
once healthy and once with one rank's data corrupted from a step between 45 and 70) the
rule found 66 of the 72 corrupted ranks and named no healthy rank; a noise estimate that
follows every draw at once found 67 but fired on 4 of those 500 growing-noise runs, one
held at 90 % a step found 62. (These figures are the 8-step rule's, with `own_window` 50.)

A departure that lasts but is small per step needs more steps than `contrast_steps` to
show: 5.5 standard errors of an 8-step median are 2.4 sigmas of a contrast, and its rise
(against the 10 steps before the 8) fades once those hold departed losses. Corrupted
GRU/LSTM ranks on held-out matrix seeds (8144, 8238, 8241: 4 and 2 ranks) sat 1.27–1.33×
the others' loss, 1.5–2.5 contrast sigmas, and were missed. So the same test also runs
over the last `long_steps` (40) contrasts, with three differences: its baseline leaves
out those 40 admissions, so the usual's own error is as large as the window's and is
counted (standard error × √(1 + 40 / baseline size)); its sigma is the larger of the
baseline's MAD and the other ranks' noise from the consecutive differences of their last
40 losses (steady; the 8-step estimate is held high against a draw low by chance, which
would hide these shifts); its rise compares the last 40 losses with the 10 before them.
Offline on those three runs' traces: named 21–37 steps after the onset (8-step rule: none).
Tried and dropped: a 24-step window with the 8-step sigma fired on a healthy 4-rank
property case (the usual's error not counted); with it counted, 24 steps found 1 of 3.
With 40 steps (`own_window` 100, so the baseline keeps 60): 0 of 150 simulated healthy
200-step runs of 2–6 ranks (shared rises up to 2.0, noise growing fourfold), none over
2 × 30,000, 4 × 15,000 and 3 × 15,000 stationary steps, 0 of 200 growing-noise runs.

What is compared: the loss only. The gradient statistics a rank reports are taken
after the data-parallel all-reduce (identical on every DDP rank) or of its own shard
(FSDP: different by design), so across ranks they carry no divergence signal; a
non-finite loss is the non_finite detector's.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gradwatch.server.detectors.base import Clear, DetectorConfig, DetectorSpec, Finding, Fire
from gradwatch.server.detectors.batch import ReportBatch
from gradwatch.server.detectors.robust import MAD_TO_SIGMA, nanmedian_columns, peer_medians
from gradwatch.server.detectors.robust import median as median_of
from gradwatch.server.ranktable import RankTable
from gradwatch.server.report import RankReport
from gradwatch.server.settings import SettingError, setting
from gradwatch.server.step_pending import StepPlan, plan

__all__ = ["MAD_TO_SIGMA", "PENDING_STEPS", "SPEC", "RankDivergenceConfig", "RankDivergenceDetector", "robust_z"]

#: Steps waiting for the other ranks' losses; older ones are dropped (a rank that stopped reporting). The agent
#: writes up to 64 reports at once (sender.PUSH_BATCH_FRAMES), so on a fast job one rank's reports of a step can
#: arrive a few batches after another's: 16 dropped most steps of a millisecond-step job.
PENDING_STEPS = 256


@dataclass(frozen=True)
class RankDivergenceConfig(DetectorConfig):
    z_threshold: float = setting(6.0, doc="A rank's |robust z-score| across ranks above this is divergent.", gt=0.0)
    rel_floor: float = setting(0.1, doc="The z-score's scale is at least this fraction of |median loss| ...", ge=0.0)
    abs_floor: float = setting(1e-6, doc="... and at least this (absolute loss units).", gt=0.0)
    consecutive: int = setting(5, doc="Complete steps in a row beyond the threshold before firing.", ge=1)
    resolve_after: int = setting(20, doc="Complete steps in a row inside before a rank clears.", ge=1)
    min_ranks: int = setting(3, doc="Ranks with a finite loss needed to judge a step.", ge=3)
    own_window: int = setting(100, doc="Contrast rule: each rank's recent admitted contrasts (complete steps).", ge=5)
    own_min_steps: int = setting(20, doc="Complete steps that only build each rank's contrast baseline.", ge=3)
    contrast_steps: int = setting(8, doc="Contrast rule: recent complete steps whose median contrast is judged.", ge=3)
    contrast_threshold: float = setting(
        5.5,
        doc="A rank departs when the median of its last `contrast_steps` contrasts exceeds its usual by this many "
        "standard errors of that median (1.2533 × sigma / √contrast_steps) ...",
        gt=0.0,
    )
    min_shift: float = setting(
        0.05, doc="... and by at least this × its starting loss level (median of its first admitted losses).", ge=0.0
    )
    long_steps: int = setting(
        40,
        doc="Contrast rule: a longer window judged the same way (its own standard error, its own rise), for "
        "departures too small per step for `contrast_steps` that last.",
        ge=3,
    )

    def _check(self) -> None:
        if self.own_min_steps > self.own_window:
            raise SettingError("own_min_steps", f"must be ≤ own_window ({self.own_window}), got {self.own_min_steps}")
        if self.long_steps < self.contrast_steps:
            raise SettingError("long_steps", f"must be ≥ contrast_steps ({self.contrast_steps}), got {self.long_steps}")
        if self.own_window < self.long_steps + self.contrast_steps:
            raise SettingError(
                "own_window",
                f"must be ≥ long_steps + contrast_steps ({self.long_steps + self.contrast_steps}: the long window's "
                f"baseline leaves out its own steps), got {self.own_window}",
            )
        if self.own_min_steps < self.contrast_steps + 3:
            raise SettingError(
                "own_min_steps", f"must be ≥ contrast_steps + 3 ({self.contrast_steps + 3}), got {self.own_min_steps}"
            )


def robust_z(values: np.ndarray, rel_floor: float, abs_floor: float) -> tuple[np.ndarray, float, float]:
    """Robust z-scores of `values` (finite) across their median; also the median and the MAD."""
    median = median_of(values)
    mad = median_of(np.abs(values - median))
    scale = max(MAD_TO_SIGMA * mad, rel_floor * abs(median), abs_floor)
    return (values - median) / scale, median, mad


#: Complete steps before the last `contrast_steps` whose losses' median is a rank's level ("its own loss rose").
LEVEL_STEPS = 10
#: Recent complete steps whose consecutive differences measure the noise now.
NOISE_STEPS = 10
NOISE_WINDOWS = (NOISE_STEPS, 5)
#: Per complete step, a rank's noise estimate falls at most to this fraction of the step before.
NOISE_DECAY = 0.8
#: The standard error of a median of n normal values is this × sigma / √n (large n; a little more for small n).
MEDIAN_ERROR = 1.2533
#: A single contrast this many sigmas above a rank's usual is not admitted into its baseline.
ADMIT_SIGMAS = 3.0


class RankDivergenceDetector:
    """Cross-rank robust z-score and per-rank contrast of every rank's loss, per complete step (module docstring)."""

    def __init__(self, config: RankDivergenceConfig) -> None:
        self._config = config
        #: step -> (loss per rank, NaN until reported; [ranks reported so far])
        self._pending: collections.OrderedDict[int, tuple[np.ndarray, list[int]]] = collections.OrderedDict()
        self._far_streak = np.zeros(0, dtype=np.int64)
        self._near_streak = np.zeros(0, dtype=np.int64)
        self._firing = np.zeros(0, dtype=bool)
        # Contrast rule, per rank: rings of admitted contrasts and the losses admitted with them (NaN: empty), how
        # many were admitted, complete steps in a row it was held out of its baseline while not firing, its
        # starting loss level (0 until warm); and the contrasts and losses of the last `_span` complete steps (NaN
        # where the rank had no finite loss), the newest at `(self._steps - 1) % self._span`.
        self._span = max(config.long_steps + LEVEL_STEPS, NOISE_STEPS)
        self._contrast = np.full((0, config.own_window), np.nan)
        self._admitted = np.full((0, config.own_window), np.nan)
        self._count = np.zeros(0, dtype=np.int64)
        self._held = np.zeros(0, dtype=np.int64)
        self._start = np.zeros(0)
        self._recent = np.full((0, self._span), np.nan)
        self._recent_loss = np.full((0, self._span), np.nan)
        self._noise = np.zeros(0)
        self._steps = 0
        #: Row i: the slots of the last `_span` complete steps, newest first, when the newest is in slot i.
        self._by_age = (np.arange(self._span)[:, None] - np.arange(self._span)) % self._span

    def observe(self, report: RankReport, ranks: RankTable) -> Sequence[Finding]:
        size = ranks.size
        pending = self._pending.get(report.step)
        if pending is None or pending[0].size != size:
            pending = self._pending[report.step] = (np.full(size, np.nan), [0])
            while len(self._pending) > PENDING_STEPS:
                self._pending.popitem(last=False)
        losses, reported = pending
        if report.rank >= size or not np.isnan(losses[report.rank]):
            return ()  # a resent report of a step already counted
        # An absent loss counts as reported (it just is not judged): NaN marks "not yet", -inf "no loss".
        losses[report.rank] = report.loss if report.loss is not None and math.isfinite(report.loss) else -math.inf
        reported[0] += 1
        if reported[0] < size:
            return ()  # O(1) per report; the O(ranks) judgement runs once per complete step
        del self._pending[report.step]
        return self._judge(losses, report.step, ranks)

    def plan_batch(self, batch: ReportBatch, ranks: RankTable) -> StepPlan | None:
        size = ranks.size
        if len(batch) and int(batch.rank.max()) >= size:
            return None
        return plan(self._pending, batch.step, batch.rank, size, PENDING_STEPS,  # type: ignore[arg-type]
                    lambda state, r: ~np.isnan(state[0][r]), first_wins=True,  # type: ignore[index]
                    fits=lambda state: state[0].size == size)  # type: ignore[index]  # fmt: skip

    def observe_batch(self, batch: ReportBatch, ranks: RankTable, steps: StepPlan) -> list[tuple[int, Finding]]:
        """`observe` for every report of the batch (see server/detectors/batch.py)."""
        size = ranks.size
        for key in steps.dropped:
            del self._pending[key]  # type: ignore[arg-type]
        with np.errstate(invalid="ignore"):
            losses = np.where(batch.has_loss & np.isfinite(batch.loss), batch.loss, -math.inf)
        for key, taken, new in zip(steps.keys, steps.taken, steps.new, strict=True):
            if new:
                self._pending[key] = (np.full(size, np.nan), [0])  # type: ignore[index]
            held, reported = self._pending[key]  # type: ignore[index]
            held[batch.rank[taken]] = losses[taken]
            reported[0] += taken.size
        findings: list[tuple[int, Finding]] = []
        for i in steps.completions():
            key = steps.keys[i]
            held, _ = self._pending.pop(key)  # type: ignore[call-overload]
            at = steps.completed_at[i]
            findings += [(at, f) for f in self._judge(held, int(key), ranks)]  # type: ignore[call-overload]
        return findings

    def tick(self, ranks: RankTable, now: float) -> Sequence[Finding]:
        return ()  # judged per complete step

    def _judge(self, losses: np.ndarray, step: int, ranks: RankTable) -> Sequence[Finding]:
        cfg = self._config
        self._fit(losses.size)
        judged = np.isfinite(losses)
        count = int(np.count_nonzero(judged))
        far = np.zeros(losses.size, dtype=bool)
        z = np.zeros(losses.size)
        median = mad = math.nan
        if count >= cfg.min_ranks:
            z[judged], median, mad = robust_z(losses[judged], cfg.rel_floor, cfg.abs_floor)
            far = judged & (np.abs(z) > cfg.z_threshold)
        contrast = self._contrast_rule(losses, judged)
        self._far_streak = np.where(far, self._far_streak + 1, 0)
        starting = ~self._firing & ((self._far_streak >= cfg.consecutive) | contrast.departed)
        odd = far | ((self._firing | starting) & contrast.above)
        # A step that cannot be judged (no loss, or too few recent contrasts) neither counts toward clearing nor
        # resets the count; a starting rank's count starts again.
        seen = judged & (contrast.judged | (cfg.min_ranks <= count))
        self._near_streak = np.where(odd | starting, 0, np.where(seen, self._near_streak + 1, self._near_streak))
        ending = self._firing & (self._near_streak >= cfg.resolve_after)
        self._firing = (self._firing | starting) & ~ending
        findings = [Finding(int(r), Clear(step=step)) for r in np.flatnonzero(ending)]
        for rank in np.flatnonzero(self._firing & (odd | starting)):
            where = ranks.describe(np.array([rank]))
            if self._far_streak[rank] >= cfg.consecutive or (far[rank] and not contrast.above[rank]):
                summary = (
                    f"loss on {where} is {z[rank]:+.1f} robust z-scores from the other ranks at step {step}: "
                    f"{losses[rank]:.4g} vs median {median:.4g} (MAD {mad:.3g}) over {count} ranks, "
                    f"for {int(self._far_streak[rank])} steps in a row"
                )
                value = float(z[rank])
            else:
                calm = [o for o in np.flatnonzero(judged & ~self._firing) if o != rank][:4]
                theirs = f" while theirs ({', '.join(f'{losses[o]:.4g}' for o in calm)}) did not follow" if calm else ""
                summary = (
                    f"loss on {where} rose away from the other ranks' at step {step}: {losses[rank]:.4g}; over "
                    f"its last {int(contrast.steps[rank])} steps it sat {contrast.shift[rank]:+.3g} further above the "
                    f"others' than usual (usually {contrast.usual[rank]:+.3g} ± {contrast.sigma[rank]:.2g}), its own "
                    f"loss {contrast.rise[rank]:+.3g} against its level before{theirs}"
                )
                value = float(contrast.score[rank])
            findings.append(Finding(int(rank), Fire(step=step, value=value, summary=summary)))
        return findings

    def _contrast_rule(self, losses: np.ndarray, judged: np.ndarray) -> _Contrast:
        """Every rank's contrast at this step against its baseline (module docstring), and the admission of the
        contrasts of ranks that did not depart."""
        cfg = self._config
        n, k = losses.size, cfg.contrast_steps
        contrast = np.full(n, np.nan)
        rows = np.flatnonzero(judged)
        if rows.size >= 2:
            contrast[rows] = losses[rows] - peer_medians(losses[rows])
        newest = self._steps % self._span
        self._recent[:, newest] = contrast
        self._recent_loss[:, newest] = np.where(judged, losses, np.nan)
        self._steps += 1
        by_age = self._by_age[newest]  # this step first
        out = _Contrast.empty(n)
        # Judged: warm, a contrast now, and most of the last k (a missing loss here and there does not blind it).
        out.judged = (self._count >= cfg.own_min_steps) & np.isfinite(contrast)
        out.judged &= np.count_nonzero(np.isfinite(self._recent[:, by_age[:k]]), axis=1) >= k // 2 + 1
        rows = np.flatnonzero(out.judged)
        if rows.size:  # (nothing to judge while every rank warms up)
            diffs = np.abs(np.diff(self._recent_loss[:, by_age[:NOISE_STEPS][::-1]]))  # oldest first
            noise = np.fmax.reduce(_row_medians([diffs[:, 1 - steps :] for steps in NOISE_WINDOWS]))
            self._window(
                out, rows, k, by_age, judged, self._noise_now(judged, rows, MAD_TO_SIGMA / math.sqrt(2.0) * noise)
            )
            if cfg.long_steps > k:
                # The long window, for ranks with enough admissions to leave its steps out of their baseline and
                # most of its steps present. Its noise is the other ranks' over the window's own steps: a median
                # of that many differences is steady (the short window's estimate is held high against a draw
                # low by chance), and noise growing within the window counts in it.
                steps = cfg.long_steps
                long = self._count[rows] >= cfg.own_min_steps + steps - k
                long &= np.count_nonzero(np.isfinite(self._recent[rows][:, by_age[:steps]]), axis=1) > steps // 2
                if long.any():
                    diffs = np.abs(np.diff(self._recent_loss[:, by_age[:steps][::-1]]))
                    window_noise = MAD_TO_SIGMA / math.sqrt(2.0) * _row_medians([diffs])[0]
                    self._window(out, rows[long], steps, by_age, judged, _peer_noise(judged, rows[long],
                                                                                     window_noise))  # fmt: skip
        return self._admit(out, contrast, losses)

    def _window(self, out: _Contrast, rows: np.ndarray, steps: int, by_age: np.ndarray, judged: np.ndarray,
                sigma: np.ndarray) -> None:  # fmt: skip
        """Judge the median of the last `steps` contrasts of `rows` against each one's baseline without its newest
        `steps` admissions; a window that scores higher than one judged before replaces its figures in `out`
        (`above` and `departed` are either window's). `sigma`: each row's noise now, the floor under its
        baseline's MAD sigma."""
        cfg = self._config
        last, before = by_age[:steps], by_age[steps : steps + LEVEL_STEPS]
        # The per-rank medians in one call: its last `steps` losses and the LEVEL_STEPS before them (its own rise),
        # its last `steps` contrasts (its shift).
        blocks = [self._recent_loss[:, last], self._recent_loss[:, before], self._recent[:, last]]
        mine_last, mine_before, recent_median = _row_medians(blocks)
        rise = mine_last - mine_before
        # The baseline leaves out the newest admissions of the window: a departure's first steps, admitted before
        # their median showed it, must not move it.
        newest_admitted = (self._count[rows, None] - 1 - np.arange(steps)) % cfg.own_window
        base = self._contrast[rows].copy()
        base[np.arange(rows.size)[:, None], newest_admitted] = np.nan
        usual = nanmedian_columns(base.T)
        mad = np.maximum(MAD_TO_SIGMA * nanmedian_columns(np.abs(base - usual[:, None]).T), cfg.abs_floor)
        sigma = np.fmax(mad, sigma)
        if steps == cfg.contrast_steps:
            out.anchor[rows] = usual
        shift = recent_median[rows] - usual
        peers = np.flatnonzero(np.isfinite(rise) & judged)
        others = np.zeros(rise.size)  # the other ranks' median rise (0 when no other rank has one)
        if peers.size >= 2:
            others[peers] = peer_medians(rise[peers])
        error = MEDIAN_ERROR * sigma / math.sqrt(steps)
        if steps > cfg.contrast_steps:  # the usual's own error, as large as the window's here, counts too
            error = error * np.sqrt(1.0 + steps / np.count_nonzero(np.isfinite(base), axis=1))
        above = (shift > cfg.contrast_threshold * error) & (shift >= cfg.min_shift * self._start[rows])
        mine = rise[rows]
        # Departed: above, and this rank's own loss rose by half the shift, and by half the shift more than the
        # others' (a partner whose loss fell, or every rank rising against a stale baseline, blames nobody).
        departed = above & (mine >= 0.5 * shift) & (mine - others[rows] >= 0.5 * shift)
        score = shift / error
        better = (score > out.score[rows]) | (steps == cfg.contrast_steps)
        at = rows[better]
        out.usual[at], out.sigma[at], out.shift[at] = usual[better], sigma[better], shift[better]
        out.rise[at], out.score[at], out.steps[at] = mine[better], score[better], steps
        out.above[rows] |= above
        out.departed[rows] |= departed

    def _admit(self, out: _Contrast, contrast: np.ndarray, losses: np.ndarray) -> _Contrast:
        """Admit this step's contrasts into the baselines (module docstring); restart baselines held out."""
        cfg = self._config
        # Admit this step's contrast unless the rank departed, fires, or this one contrast alone is out (the first
        # steps of a departure, before their median shows it, must not move the baseline toward it).
        one = np.where(out.judged, contrast - out.anchor, 0.0) > ADMIT_SIGMAS * out.sigma
        admit = np.isfinite(contrast) & ~out.above & ~self._firing & ~one
        rows = np.flatnonzero(admit)
        slots = self._count[rows] % cfg.own_window
        self._contrast[rows, slots] = contrast[rows]
        self._admitted[rows, slots] = losses[rows]
        self._count[rows] += 1
        warm = rows[(self._count[rows] == cfg.own_min_steps) & (self._start[rows] == 0)]
        if warm.size:
            self._start[warm] = np.abs(np.median(self._admitted[warm, : cfg.own_min_steps], axis=1))
        # A rank held out of its baseline for own_min_steps steps without departing has a new usual contrast (a
        # partner's loss fell, a fixed rank came back, the ranks' shards changed): its baseline starts again.
        held = np.isfinite(contrast) & ~admit & ~self._firing & ~out.departed
        self._held = np.where(held, self._held + 1, np.where(admit, 0, self._held))
        restart = self._held >= cfg.own_min_steps
        if restart.any():
            self._restart(np.flatnonzero(restart))
        return out

    def _noise_now(self, judged: np.ndarray, rows: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """For each rank of `rows`, the sigma its contrast would have now if it were like the others: the median of
        the other judged ranks' batch noise (`noise`: each rank's, from the consecutive differences of its last
        NOISE_WINDOWS losses, the larger of a steadier and a quicker estimate, which a level shift moves once; NaN
        without two recent losses), × √(1 + 1/others) for the others' median it is compared with. A model leaving
        chance tells its batches apart and every rank gets noisier at once; a corrupted rank's own, noisier losses
        do not count for it (they are what is judged)."""
        # Each rank's noise rises with its estimate at once and falls by NOISE_DECAY a step: an estimate from a few
        # differences scatters widely, and a low draw just after the noise grew must not stand for the noise.
        held = np.where(np.isfinite(self._noise), self._noise * NOISE_DECAY, np.nan)
        self._noise = noise = np.where(np.isfinite(noise), np.fmax(noise, held), held)
        return _peer_noise(judged, rows, noise)

    def _restart(self, rows: np.ndarray) -> None:
        """Forget the contrast baselines of `rows` (they warm up again; the starting loss level stays)."""
        self._contrast[rows] = np.nan
        self._admitted[rows] = np.nan
        self._count[rows] = 0
        self._held[rows] = 0

    def _fit(self, size: int) -> None:
        extra = size - self._firing.size
        if extra > 0:
            cfg = self._config

            def grow(array: np.ndarray, fill: float | int | bool, width: int = 0) -> np.ndarray:
                shape = (extra, width) if width else (extra,)
                return np.concatenate([array, np.full(shape, fill, dtype=array.dtype)])

            self._far_streak, self._near_streak = grow(self._far_streak, 0), grow(self._near_streak, 0)
            self._firing, self._count, self._held = grow(self._firing, False), grow(self._count, 0), grow(self._held, 0)
            self._start, self._noise = grow(self._start, 0), grow(self._noise, np.nan)
            self._contrast = grow(self._contrast, np.nan, cfg.own_window)
            self._admitted = grow(self._admitted, np.nan, cfg.own_window)
            self._recent = grow(self._recent, np.nan, self._span)
            self._recent_loss = grow(self._recent_loss, np.nan, self._span)
            # More ranks: every contrast now compares with a different median, so every baseline starts again.
            self._restart(np.arange(size))
            self._recent[:] = np.nan


def _peer_noise(judged: np.ndarray, rows: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """For each rank of `rows`, the median of the other judged ranks' `noise` (NaN: unknown) × √(1 + 1/others),
    the sigma of its contrast if it were like them; 0 where fewer than two ranks have one."""
    peers = np.flatnonzero(judged & np.isfinite(noise))
    if peers.size < 2:
        return np.zeros(rows.size)
    others = np.zeros(judged.size)
    others[peers] = peer_medians(noise[peers])
    known = np.zeros(judged.size, dtype=bool)
    known[peers] = True
    return np.where(known[rows], others[rows], 0.0) * math.sqrt(1.0 + 1.0 / (peers.size - 1))


def _row_medians(blocks: list[np.ndarray]) -> list[np.ndarray]:
    """Each block's per-row median ignoring NaN (`np.nanmedian(block, axis=1)`, bit for bit), through one
    `nanmedian_columns` call: blocks of equal row counts side by side, padded with NaN to the widest."""
    rows, width = blocks[0].shape[0], max(block.shape[1] for block in blocks)
    stacked = np.full((width, rows * len(blocks)), np.nan)
    for i, block in enumerate(blocks):
        stacked[: block.shape[1], i * rows : (i + 1) * rows] = block.T
    medians = nanmedian_columns(stacked)
    return [medians[i * rows : (i + 1) * rows] for i in range(len(blocks))]


@dataclass
class _Contrast:
    """The contrast rule's figures for one complete step, per rank (0 / False where a rank is not judged)."""

    usual: np.ndarray
    #: The short window's usual contrast (single contrasts far above it are not admitted).
    anchor: np.ndarray
    sigma: np.ndarray
    shift: np.ndarray
    rise: np.ndarray
    score: np.ndarray
    above: np.ndarray
    departed: np.ndarray
    judged: np.ndarray
    #: The window (complete steps) whose figures these are.
    steps: np.ndarray

    @classmethod
    def empty(cls, n: int) -> _Contrast:
        usual, anchor, sigma, shift, rise, score = np.zeros((6, n))
        above, departed, judged = np.zeros((3, n), dtype=bool)
        return cls(usual, anchor, sigma, shift, rise, score, above, departed, judged, np.zeros(n, dtype=np.int64))


SPEC = DetectorSpec(
    name="rank_divergence",
    severity="warning",
    description="One rank's loss far from the other ranks' at the same steps (bad data or a faulty device).",
    config_type=RankDivergenceConfig,
    factory=lambda config: RankDivergenceDetector(config),
    scope="run",
)
