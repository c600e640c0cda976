"""What every detector is: a spec (identity, severity, runbook, config) and a per-run instance.

Contract
--------
* One detector instance per run, created by `DetectorSpec.create(config)`; it keeps
  its own per-rank state and is dropped with the run.
* `observe(report)` is called for every report of every rank, in order per rank,
  from one thread at a time. It must be cheap (O(1) or O(window) numpy work) and
  must not raise on odd data.
* It returns `Fire` while the rank is abnormal (every abnormal report, so the alert
  tracks the latest step and value), `Clear` once when the rank has recovered, and
  None otherwise. The alert book merges ranks into one alert per (run, detector).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from gradwatch.server.report import RankReport
from gradwatch.server.settings import Settings, setting

__all__ = [
    "SEVERITIES",
    "Clear",
    "Detector",
    "DetectorConfig",
    "DetectorSpec",
    "Fire",
    "Verdict",
    "alert_name_for",
]

#: Alertmanager's usual severities, most urgent first.
SEVERITIES = ("critical", "warning", "info")
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


@dataclass(frozen=True)
class DetectorSpec:
    """A registered detector: stable identity and how to build it.

    `name` is the stable label value and alert identity; `runbook` a repository path
    to the page an on-call engineer reads first. `inhibits` names the detectors whose
    alerts this one suppresses for the same run while it fires (a NaN explains an
    exploding gradient and a diverging loss; one page is enough). Names of detectors
    that are not registered are allowed and simply never match.
    """

    name: str
    severity: str
    description: str
    config_type: type[DetectorConfig]
    factory: Callable[[DetectorConfig], Detector]
    inhibits: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"detector {self.name!r}: severity must be one of {SEVERITIES}")
        for name in (self.name, *self.inhibits):
            alert_name_for(name)  # raises on a malformed name
        if self.name in self.inhibits:
            raise ValueError(f"detector {self.name!r} cannot inhibit itself")

    @property
    def alert_name(self) -> str:
        """CamelCase alertname shared by every delivery path (see alert_name_for)."""
        return alert_name_for(self.name)

    @property
    def runbook(self) -> str:
        return f"docs/runbooks/{self.name}.md"

    def create(self, config: DetectorConfig) -> Detector:
        if not isinstance(config, self.config_type):
            raise TypeError(f"detector {self.name!r} needs a {self.config_type.__name__}")
        return self.factory(config)
