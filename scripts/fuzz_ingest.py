#!/usr/bin/env python3
"""Coverage-guided fuzzing of the server's ingest path (atheris / libFuzzer), the long run behind the
bounded property tests in tests/test_fuzz_server.py.

    python scripts/fuzz_ingest.py --seconds 300            # atheris if installed, else a long hypothesis run
    python scripts/fuzz_ingest.py --seconds 60 --hypothesis
    pip install -e '.[fuzz]'                               # atheris and hypothesis

One input is one agent stream: a sequence of length-prefixed serialised AgentFrames (2-byte little-endian
length, then the bytes). It goes through the server's own ingest path (tests/fuzz_support.run_ingest: parse,
validate, open, apply with every detector, close) on a real ServerApp's Ingestor, without the transport.
FrameRejected is the expected refusal; any other exception is a crash (atheris stops and writes the input as
crash-*). The seed corpus is coherent streams from the hypothesis generators (valid Hellos, matching columns,
hostile numbers), so mutations start from frames that get deep into the detectors. Every 2,000 cases the
script checks the process's resident memory against --max-rss-mib and rewrites the summary file (JSON:
engine, cases, crashes, outcomes by rejection reason, peak RSS, seconds; libFuzzer ends the process from C, so
the file is the record; its own final statistics follow on stderr). docs/security.md records a run.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import json
import os
import resource
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the generators live with the tests that use them

CHECK_EVERY = 2000


def encode(raws: list[bytes]) -> bytes:
    """A fuzz input from serialised frames (each cut to 65,535 bytes)."""
    return b"".join(struct.pack("<H", len(r[:65535])) + r[:65535] for r in raws)


def decode(data: bytes) -> list[bytes]:
    raws, pos = [], 0
    while pos + 2 <= len(data) and len(raws) < 64:
        (n,) = struct.unpack_from("<H", data, pos)
        raws.append(data[pos + 2 : pos + 2 + n])
        pos += 2 + n
    return raws or [data]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Target:
    """Feeds inputs to a fresh-enough server and keeps the tally."""

    def __init__(self, max_rss_mib: float, summary: Path, engine: str) -> None:
        from fuzz_support import run_ingest
        from gradwatch.server.app import ServerApp
        from gradwatch.server.config import LimitsConfig, ServerConfig

        self._run_ingest = run_ingest
        config = ServerConfig.local()
        config = config.__class__(**{**config.__dict__, "limits": LimitsConfig(max_runs=200, at_max_runs="evict_idle")})
        self.app = ServerApp(config)  # not started: the ingest path is driven directly
        self.max_rss_mib = max_rss_mib
        self.summary_path = summary
        self.engine = engine
        self.crashes = 0
        self.cases = 0
        self.reasons: collections.Counter[str] = collections.Counter()
        self.started = time.monotonic()

    def __call__(self, data: bytes) -> None:
        self.cases += 1
        reason = self._run_ingest(self.app.ingestor, self.app.config.limits, decode(data))
        self.reasons[reason] += 1
        if self.cases % CHECK_EVERY == 0:
            self.app.ingestor.tick()  # the timer-driven detectors judge the fuzzed runs too
            self.app.ingestor.sweep()
            self.write_summary()
            rss = peak_rss_mib()
            if rss > self.max_rss_mib:
                raise MemoryError(f"peak RSS {rss:.0f} MiB over --max-rss-mib {self.max_rss_mib:.0f}")

    def guarded(self, data: bytes) -> None:
        try:
            self(data)
        except BaseException:
            self.crashes += 1
            self.write_summary()
            raise

    def write_summary(self) -> dict[str, Any]:
        summary = self.summary()
        self.summary_path.write_text(json.dumps(summary, indent=1) + "\n")
        return summary

    def summary(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "cases": self.cases,
            "crashes": self.crashes,
            "seconds": round(time.monotonic() - self.started, 1),
            "peak_rss_mib": round(peak_rss_mib()),
            "outcomes": dict(self.reasons.most_common()),
        }


def seed_corpus(directory: Path, count: int) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from fuzz_support import coherent_streams, messages
    from gradwatch.v1 import gradwatch_pb2 as pb

    made: list[bytes] = []

    @settings(max_examples=count, database=None, suppress_health_check=list(HealthCheck), deadline=None)
    @given(st.one_of(coherent_streams(), st.lists(messages(pb.AgentFrame.DESCRIPTOR), min_size=1, max_size=3)))
    def collect(frames: list[Any]) -> None:
        made.append(encode([f.SerializeToString() for f in frames]))

    collect()
    for i, data in enumerate(made):
        (directory / f"seed-{i:04d}").write_bytes(data)


def run_atheris(args: argparse.Namespace) -> int:
    import atheris

    with atheris.instrument_imports(include=["gradwatch.server", "gradwatch.v1"]):
        import gradwatch.server.app  # noqa: F401  (instrumented for coverage)

    os.makedirs(args.artifacts, exist_ok=True)
    target = Target(args.max_rss_mib, Path(args.artifacts) / "summary.json", "atheris")
    corpus = Path(tempfile.mkdtemp(prefix="gradwatch-fuzz-"))
    seed_corpus(corpus, args.seeds)
    atexit.register(target.write_summary)  # when Python gets to run it; the periodic writes cover the rest
    argv = [sys.argv[0], f"-max_total_time={args.seconds}", "-rss_limit_mb=0", f"-artifact_prefix={args.artifacts}/",
            "-print_final_stats=1", str(corpus)]  # fmt: skip
    atheris.Setup(argv, target.guarded)
    atheris.Fuzz()
    return 0


def run_hypothesis(args: argparse.Namespace) -> int:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from fuzz_support import coherent_streams, messages
    from gradwatch.v1 import gradwatch_pb2 as pb

    os.makedirs(args.artifacts, exist_ok=True)
    target = Target(args.max_rss_mib, Path(args.artifacts) / "summary.json", "hypothesis")
    deadline = time.monotonic() + args.seconds
    frames = st.one_of(
        coherent_streams(),
        st.lists(messages(pb.AgentFrame.DESCRIPTOR), min_size=1, max_size=4),
        st.lists(st.binary(max_size=600), min_size=1, max_size=3).map(lambda raws: [_Raw(r) for r in raws]),
    )

    @settings(max_examples=10**9, database=None, suppress_health_check=list(HealthCheck), deadline=None)
    @given(frames)
    def case(items: list[Any]) -> None:
        if time.monotonic() > deadline:
            raise _TimeUp
        target(encode([item.SerializeToString() for item in items]))

    try:
        case()
    except _TimeUp:
        pass
    except Exception:
        target.crashes += 1
        raise
    finally:
        print(json.dumps(target.write_summary()), flush=True)
    return 0


class _TimeUp(Exception):
    pass


class _Raw:
    def __init__(self, raw: bytes) -> None:
        self._raw = raw

    def SerializeToString(self) -> bytes:
        return self._raw


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=300, help="how long to fuzz (default 300)")
    parser.add_argument("--hypothesis", action="store_true", help="use hypothesis even if atheris is installed")
    parser.add_argument("--seeds", type=int, default=200, help="seed inputs made by the generators (atheris)")
    parser.add_argument("--max-rss-mib", type=float, default=2048.0, help="fail when the process grows beyond")
    parser.add_argument("--artifacts", default="fuzz-artifacts", help="crashing inputs and summary.json go here")
    args = parser.parse_args()
    if not args.hypothesis:
        try:
            import atheris  # noqa: F401
        except ImportError:
            print("atheris is not installed: running hypothesis instead", file=sys.stderr)
        else:
            return run_atheris(args)
    return run_hypothesis(args)


if __name__ == "__main__":
    sys.exit(main())
