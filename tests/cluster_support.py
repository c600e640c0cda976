"""Server settings for tests of cross-rank detectors on real, seconds-long multi-process jobs (no torch here)."""

from __future__ import annotations

import dataclasses
import types

from gradwatch.server.config import ServerConfig
from gradwatch.server.detectors.rank_divergence import RankDivergenceConfig
from gradwatch.server.detectors.stalled import StalledConfig
from gradwatch.server.detectors.straggler import StragglerConfig
from gradwatch.server.detectors.throughput_drop import ThroughputDropConfig


def cluster_config() -> ServerConfig:
    """Loopback, port-0 server whose cross-rank detectors decide within seconds-long jobs, with thresholds far
    from what a loaded machine's jitter reaches (jobs sleep ≥ 50 ms per step, so step times stay steady)."""
    base = ServerConfig.local()
    detectors = dict(base.detectors)
    detectors["rank_divergence"] = RankDivergenceConfig(consecutive=4)
    detectors["straggler"] = StragglerConfig(consecutive=3, min_reports=6)
    detectors["stalled"] = StalledConfig(floor_s=8.0, factor=20.0)
    detectors["throughput_drop"] = ThroughputDropConfig(ratio=0.4, min_steps=8, recent=5, consecutive=6, sustain_s=2.0)
    return dataclasses.replace(base, detectors=types.MappingProxyType(detectors))
