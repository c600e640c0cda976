"""What every detector is: a spec (identity, severity, runbook, config) and a per-run instance.

Contract
--------
* One detector instance per run, created by `DetectorSpec.create(config)`; it keeps
  its own per-rank state and is dropped with the run.
* `observe(report)` is called for every report of every rank, in order per rank,
  from one thread at a time. It must be cheap (O(1) or O(window) numpy work) and
  must not raise on odd data. `forget(rank)` is called when a rank restarts (a new
  agent session whose steps began again: a job restarted from scratch or from a
  checkpoint under the same run id, a second `fit()` in one process): the rank is
  then judged afresh.
* It returns `Fire` while the rank is abnormal (every abnormal report, so the alert
  tracks the latest step and value), `Clear` once when the rank has recovered, and
  None otherwise. The alert book merges ranks into one alert per (run, detector).

Cross-rank detectors (`DetectorSpec.scope == "run"`)
----------------------------------------------------
Some faults show only when ranks are compared (one rank's loss far from the others',
replicas whose weights differ, a rank slower than its peers) or only while nothing
arrives (a hang). Such a detector implements `RunDetector` instead:

* `observe(report, ranks)` is called for every report like `Detector.observe`, with
  the run's `RankTable` (server/ranktable.py: each rank's latest state as numpy arrays
  indexed by rank, already updated with this report). It keeps whatever per-step
  state it needs (bounded) and judges all ranks at once, vectorised over ranks, when
  it has what it needs (e.g. every rank reported a step).
* `tick(ranks, now)` is called by the server's timer (every `TICK_INTERVAL_S`, on the
  ingest thread, for every run not yet expired) whether or not anything arrived: the
  only way to notice that nothing arrives. Ranks that said goodbye are marked
  `finished` in the table; a detector clears what it fired for them.
* Both return `Finding`s: a `Fire` or `Clear` for a named rank, any rank of the run
  (the straggler, the hung rank, the corrupted replica), with the same semantics as
  above; the alert book merges them the same way. Neither may raise on odd data.

What a detector is shown
------------------------
Most reports are ordinary ones (no per-layer columns, activations, update ratios...), and a detector that
judges only those parts has nothing to do on them. `DetectorSpec.needs` names the parts (REPORT_PARTS) of
which a report must carry at least one for `observe` to be called: such a detector promises that, on a
report without any of them, `observe` returns None (or no finding) and changes nothing. A cross-rank detector
whose `observe` never does anything (it judges on ticks) says `observes=False`. The ingestor skips those calls
(`report_parts` says what a report carries); tests/test_server_detector_needs.py checks the promise on
generated reports.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from gradwatch.server.ranktable import RankTable
from gradwatch.server.report import RankReport
from gradwatch.server.settings import Settings, setting

__all__ = [
    "REPORT_PARTS",
    "SCOPES",
    "SEVERITIES",
    "TICK_INTERVAL_S",
    "Clear",
    "Detector",
    "DetectorConfig",
    "DetectorSpec",
    "Finding",
    "Fire",
    "RunDetector",
    "Verdict",
    "alert_name_for",
    "report_parts",
]

#: Alertmanager's usual severities, most urgent first.
SEVERITIES = ("critical", "warning", "info")
#: "rank": a `Detector` judging each report on its own; "run": a `RunDetector` comparing ranks.
SCOPES = ("rank", "run")
#: Seconds between two `RunDetector.tick` calls.
TICK_INTERVAL_S = 1.0
#: The optional parts of a RankReport a detector may need (`DetectorSpec.needs`), by bit of `report_parts`.
REPORT_PARTS = ("columns", "activations", "update_ratio", "output_spread", "label_histogram", "param_checksum")
#: Detector names are label values, file names and the source of CamelCase alert names.
_NAME = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)*")


def alert_name_for(detector: str) -> str:
    """The CamelCase `alertname` of a detector's alerts: "non_finite" -> "GradwatchNonFinite".

    Used by the Alertmanager push and the Prometheus/Grafana rules alike, so a page has
    one name whichever path delivered it. Defined for any well-formed name, including
    detectors that do not exist yet (inhibition rules may name them).
    """
    if not _NAME.fullmatch(detector):
        raise ValueError(f"detector name must be snake_case ([a-z][a-z0-9_]*), got {detector!r}")
    return "Gradwatch" + "".join(part.capitalize() for part in detector.split("_"))


@dataclass(frozen=True)
class DetectorConfig(Settings):
    """Settings every detector has; subclasses add their thresholds."""

    enabled: bool = setting(True, doc="Run this detector on every report.")


@dataclass(frozen=True, slots=True)
class Fire:
    """The rank is abnormal at `step`.

    `value` is the number the detector judged (None if there is none); `summary` is
    one human sentence; `layer` the schema name of the implicated layer, if known.
    """

    step: int
    value: float | None
    summary: str
    layer: str | None = None


@dataclass(frozen=True, slots=True)
class Clear:
    """The rank has recovered at `step`."""

    step: int


Verdict = Fire | Clear


class Detector(Protocol):
    """A per-run detector instance (see module docstring for the contract)."""

    def observe(self, report: RankReport) -> Verdict | None: ...

    def forget(self, rank: int) -> None:
        """`rank` restarted (a new agent session whose steps began again): drop everything kept about it, so
        that its next report is judged as a new rank's first. Other ranks are untouched."""
        ...


def forget_rank(rank: int, *holders: dict[int, Any] | Forgetting) -> None:
    """Drop `rank` from per-rank state: dicts keyed by rank, and objects that forget ranks themselves."""
    for holder in holders:
        if isinstance(holder, dict):
            holder.pop(rank, None)
        else:
            holder.forget(rank)


class Forgetting(Protocol):
    def forget(self, rank: int) -> None: ...


@dataclass(frozen=True, slots=True)
class Finding:
    """A cross-rank detector's verdict about one rank of the run."""

    rank: int
    verdict: Verdict
    #: The report the verdict is about, when the detector holds it (its batch ids go into the alert's autopsy).
    report: RankReport | None = None


class RunDetector(Protocol):
    """A per-run cross-rank detector (see "Cross-rank detectors" in the module docstring)."""

    def observe(self, report: RankReport, ranks: RankTable) -> Sequence[Finding]: ...

    def tick(self, ranks: RankTable, now: float) -> Sequence[Finding]: ...


#: The settings class of one detector; `DetectorSpec[C]` ties its `config_type` to what its `factory` takes.
C = TypeVar("C", bound=DetectorConfig)


@dataclass(frozen=True)
class DetectorSpec(Generic[C]):
    """A registered detector: stable identity and how to build it.

    `name` is the stable label value and alert identity; `runbook` a repository path
    to the page an on-call engineer reads first. `inhibits` names the detectors whose
    alerts this one suppresses for the same run while it fires (a NaN explains an
    exploding gradient and a diverging loss; one page is enough). Names of detectors
    that are not registered are allowed and simply never match. `scope` is "rank" for
    a per-report `Detector`, "run" for a cross-rank `RunDetector`.
    """

    name: str
    severity: str
    description: str
    config_type: type[C]
    factory: Callable[[C], Detector | RunDetector]
    inhibits: tuple[str, ...] = ()
    scope: str = "rank"
    #: Parts of REPORT_PARTS of which a report must carry one for `observe` to be called; () = every report.
    needs: tuple[str, ...] = ()
    #: False: `observe` does nothing (a cross-rank detector that judges on ticks) and is never called.
    observes: bool = True

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"detector {self.name!r}: severity must be one of {SEVERITIES}")
        if self.scope not in SCOPES:
            raise ValueError(f"detector {self.name!r}: scope must be one of {SCOPES}")
        for name in (self.name, *self.inhibits):
            alert_name_for(name)  # raises on a malformed name
        if self.name in self.inhibits:
            raise ValueError(f"detector {self.name!r} cannot inhibit itself")
        unknown = set(self.needs) - set(REPORT_PARTS)
        if unknown:
            raise ValueError(f"detector {self.name!r}: needs {sorted(unknown)}, not among {REPORT_PARTS}")
        if not self.observes and self.scope != "run":
            raise ValueError(f"detector {self.name!r}: only a cross-rank detector may judge on ticks alone")

    @property
    def needs_mask(self) -> int:
        """`needs` as bits of `report_parts` (0: every report)."""
        return sum(1 << REPORT_PARTS.index(part) for part in self.needs)

    @property
    def alert_name(self) -> str:
        """CamelCase alertname shared by every delivery path (see alert_name_for)."""
        return alert_name_for(self.name)

    @property
    def runbook(self) -> str:
        return f"docs/runbooks/{self.name}.md"

    def create(self, config: DetectorConfig) -> Detector | RunDetector:
        if not isinstance(config, self.config_type):
            raise TypeError(f"detector {self.name!r} needs a {self.config_type.__name__}")
        return self.factory(config)


def report_parts(report: RankReport) -> int:
    """Bits (by REPORT_PARTS) of the optional parts `report` carries: columns and activations non-empty, the
    others present."""
    return (
        (1 if report.columns else 0)
        | (2 if report.activations else 0)
        | (4 if report.update_ratio is not None else 0)
        | (8 if report.output_spread is not None else 0)
        | (16 if report.label_histogram is not None else 0)
        | (32 if report.param_checksum is not None else 0)
    )
