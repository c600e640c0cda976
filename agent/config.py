"""Every agent setting, its environment variable, default and accepted values: the one place they live.

Precedence, highest first: a keyword given to `attach()`, its `GRADWATCH_*` environment variable, the
default below. The kill switch is the exception: `GRADWATCH_DISABLED=1` wins over everything (an operator
can always turn the agent off without touching code), and while it is on nothing else is read or checked.

The schema is `AgentConfig`: each field is a `setting(default, doc=..., ge=...)` (gradwatch.settings, the same
declaration as the server's), so its default, doc line and numeric range are stated once; `_OPTIONS` below adds
each option's environment variable and check, and the numeric checks take their ranges from the schema
(`_ranged`). docs/configuration.md has the table for users, checked against both by tests/test_docs.py.

The run id must be the same on every rank of a job. torchrun sets TORCHELASTIC_RUN_ID for all ranks; the
"<hostname>-<pid>" fallback only makes sense for a single process, so set GRADWATCH_RUN (or `run=`) for
multi-process jobs launched any other way.

This module imports neither torch nor grpc at import time.
"""

from __future__ import annotations

import json
import math
import operator
import os
import random
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from gradwatch.agent.actions import ON_ALERT_CHOICES
from gradwatch.agent.guard_config import GuardSettings, check_guard, parse_guard_env
from gradwatch.settings import setting

__all__ = [
    "ATTACH_OBJECTS",
    "ENV_DISABLED",
    "OPTION_NAMES",
    "AgentConfig",
    "RetryPolicy",
    "kill_switch_on",
    "resolve_config",
]

ENV_SERVER = "GRADWATCH_SERVER"
ENV_SERVERS = "GRADWATCH_SERVERS"
ENV_TOKEN = "GRADWATCH_TOKEN"
ENV_TOKEN_FILE = "GRADWATCH_TOKEN_FILE"
ENV_TLS = "GRADWATCH_TLS"
ENV_TLS_CA_FILE = "GRADWATCH_TLS_CA_FILE"
ENV_TLS_CLIENT_CERT_FILE = "GRADWATCH_TLS_CLIENT_CERT_FILE"
ENV_TLS_CLIENT_KEY_FILE = "GRADWATCH_TLS_CLIENT_KEY_FILE"
ENV_RUN = "GRADWATCH_RUN"
ENV_JOB_NAME = "GRADWATCH_JOB_NAME"
ENV_FULL_STATS_INTERVAL = "GRADWATCH_FULL_STATS_INTERVAL"
ENV_DISABLED = "GRADWATCH_DISABLED"
ENV_REPLAY_BUFFER_SIZE = "GRADWATCH_REPLAY_BUFFER_SIZE"
ENV_QUEUE_SIZE = "GRADWATCH_QUEUE_SIZE"
ENV_HEARTBEAT_INTERVAL_S = "GRADWATCH_HEARTBEAT_INTERVAL_S"
ENV_WELCOME_TIMEOUT_S = "GRADWATCH_WELCOME_TIMEOUT_S"
ENV_EXIT_FLUSH_TIMEOUT_S = "GRADWATCH_EXIT_FLUSH_TIMEOUT_S"
ENV_GRAD_ACCUMULATION = "GRADWATCH_GRAD_ACCUMULATION"
ENV_FORWARD_HOOKS = "GRADWATCH_FORWARD_HOOKS"
ENV_TRACK_COLLECTIVES = "GRADWATCH_TRACK_COLLECTIVES"
ENV_DDP_COMM_HOOK = "GRADWATCH_DDP_COMM_HOOK"
ENV_OVERHEAD_BUDGET = "GRADWATCH_OVERHEAD_BUDGET"
ENV_ON_ALERT = "GRADWATCH_ON_ALERT"
ENV_DETECTORS = "GRADWATCH_DETECTORS"  # JSON: {"detector": {"setting": value}}
ENV_GUARD = "GRADWATCH_GUARD"  # a policy name or a JSON object of guard settings
ENV_RETRY_INITIAL_BACKOFF_S = "GRADWATCH_RETRY_INITIAL_BACKOFF_S"
ENV_RETRY_MAX_BACKOFF_S = "GRADWATCH_RETRY_MAX_BACKOFF_S"
# Set by launchers, not by us: read as fallbacks only.
ENV_TORCHELASTIC_RUN_ID = "TORCHELASTIC_RUN_ID"
ENV_RANK, ENV_WORLD_SIZE, ENV_LOCAL_RANK = "RANK", "WORLD_SIZE", "LOCAL_RANK"

DEFAULT_SERVER = "localhost:50051"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


@dataclass(frozen=True)
class RetryPolicy:
    """How the sender waits between stream attempts (data, so tests and users can tune it).

    Attempt n (0-based) waits min(initial_backoff_s * multiplier**n, max_backoff_s), scaled by a uniform
    factor in [1 - jitter, 1 + jitter] so that many ranks do not reconnect in lockstep. A stream the server
    *rejects* (a status in `rejected_codes`: retrying soon would fail the same way) waits
    `rejected_backoff_s` instead, with the same jitter. Every other failure is retried. The waits are Event
    waits: close() interrupts them.
    """

    initial_backoff_s: float = 0.5
    multiplier: float = 1.6
    max_backoff_s: float = 30.0
    jitter: float = 0.2
    rejected_backoff_s: float = 30.0
    rejected_codes: frozenset[str] = field(
        default=frozenset(
            {"FAILED_PRECONDITION", "INVALID_ARGUMENT", "UNAUTHENTICATED", "PERMISSION_DENIED", "UNIMPLEMENTED"}
        )
    )

    def __post_init__(self) -> None:
        for name in ("initial_backoff_s", "max_backoff_s", "rejected_backoff_s"):
            _check_positive_float(f"retry.{name}", getattr(self, name))
        if not _is_real(self.multiplier) or self.multiplier < 1.0:
            raise ValueError(f"gradwatch: retry.multiplier must be a number >= 1.0, got {self.multiplier!r}")
        if not _is_real(self.jitter) or not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"gradwatch: retry.jitter must be a number in [0, 1), got {self.jitter!r}")
        if self.max_backoff_s < self.initial_backoff_s:
            raise ValueError(
                f"gradwatch: retry.max_backoff_s ({self.max_backoff_s}) must be >= retry.initial_backoff_s "
                f"({self.initial_backoff_s})"
            )

    def delay_s(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before retry number `attempt` (0-based) after a retryable failure."""
        base = min(self.initial_backoff_s * self.multiplier ** min(attempt, 64), self.max_backoff_s)
        return base * rng.uniform(1.0 - self.jitter, 1.0 + self.jitter)

    def rejected_delay_s(self, rng: random.Random) -> float:
        """Seconds to wait after the server rejected the stream."""
        return self.rejected_backoff_s * rng.uniform(1.0 - self.jitter, 1.0 + self.jitter)


@dataclass(frozen=True)
class AgentConfig:
    """The resolved settings of one Monitor: the agent's schema. Each field's default, doc line and numeric range
    (`setting`, shared with the server's schema) are stated here once: resolve_config's checks take the ranges
    from it, and tests/test_docs.py holds docs/configuration.md's table to it."""

    server: str = setting(DEFAULT_SERVER, doc="the server's gRPC address, host:port")
    servers: tuple[str, ...] = setting((), doc="server replicas; each run goes to one by rendezvous hashing")
    token: str = setting("", doc="bearer token sent on every call (never in repr or logs)", repr=False)
    token_file: str = setting("", doc="file holding the bearer token, re-read for every new connection")
    tls: bool = setting(False, doc="TLS to the server (implied by any tls_* file)")
    tls_ca_file: str = setting("", doc="CA bundle that signs the server's certificate")
    tls_client_cert_file: str = setting("", doc="client certificate for mutual TLS")
    tls_client_key_file: str = setting("", doc="client key for mutual TLS")
    run_id: str = setting("", doc="the run's id, the same on every rank")
    job_name: str = setting("", doc="a label for the job")
    full_stats_interval: int = setting(10, doc="steps between full-statistics reports", gt=0)
    enabled: bool = setting(True, doc="off: attach() returns a no-op monitor")
    replay_buffer_size: int = setting(1024, doc="unacknowledged frames kept for resending", gt=0)
    queue_size: int = setting(1024, doc="reports waiting for the sender", gt=0)
    heartbeat_interval_s: float = setting(5.0, doc="seconds between heartbeats", gt=0)
    welcome_timeout_s: float = setting(10.0, doc="seconds to wait for the server's Welcome", gt=0)
    exit_flush_timeout_s: float = setting(2.0, doc="seconds the atexit flush may take", gt=0)
    grad_accumulation: bool = setting(False, doc="one report per optimizer step, not per step() call")
    forward_hooks: bool = setting(True, doc="activation, input and label statistics, NaN provenance")
    track_collectives: bool = setting(True, doc="collective progress and the stuck training thread's stack")
    #: Opt-in, since it takes DDP's one hook slot and costs an extra pass over each gradient bucket.
    ddp_comm_hook: bool = setting(False, doc="a DDP communication hook timing each rank's work between collectives")
    overhead_budget: float = setting(0.01, doc="the agent's share of step time (0: no controller)", ge=0, lt=1)
    on_alert: str = setting("observe", doc="what a critical alert does at the next step()")
    #: As ("detector.setting", JSON value) pairs (see `_check_detectors`).
    detector_settings: tuple[tuple[str, str], ...] = setting((), doc="per-run detector settings for the server")
    # setting() returns a dataclasses.field (ruff's RUF009 cannot know): each instance gets its own default.
    retry: RetryPolicy = setting(doc="how the sender waits between stream attempts", factory=RetryPolicy)  # noqa: RUF009
    guard: GuardSettings = setting(doc="the spike and NaN guard (guard.py); off unless asked for",  # noqa: RUF009
                                   factory=GuardSettings)  # fmt: skip
    rank: int = setting(0, doc="this process's rank", ge=0)
    world_size: int = setting(1, doc="ranks in the job", gt=0)
    local_rank: int = setting(0, doc="this process's rank on its host", ge=0)


def kill_switch_on(env: Mapping[str, str] | None = None) -> bool:
    """True when GRADWATCH_DISABLED asks for the agent to be off. Garbage values raise ValueError."""
    env = os.environ if env is None else env
    text = env.get(ENV_DISABLED, "").strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(
        f"gradwatch: {ENV_DISABLED}={env[ENV_DISABLED]!r} is invalid: expected 1/true/yes/on (agent off) "
        "or 0/false/no/off/empty (agent on)"
    )


# ------------------------------------------------------------------ validation helpers


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def _check_positive_float(label: str, value: object) -> float:
    if not _is_real(value) or value <= 0 or value == float("inf"):  # type: ignore[operator]
        raise ValueError(f"gradwatch: {label}={value!r} is invalid: expected a finite number of seconds > 0")
    return float(value)  # type: ignore[arg-type]


_BOUNDS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<")}


def _ranged(name: str) -> Callable[[str, object], object]:
    """The check of numeric option `name`: its type and range as AgentConfig's schema declares them (an int field
    takes integers, a float field finite numbers; seconds are named so in the message)."""
    spec = {f.name: f for f in fields(AgentConfig)}[name]
    integer = spec.type in ("int", int)
    limits = [(_BOUNDS[key], spec.metadata[key]) for key in _BOUNDS if spec.metadata.get(key) is not None]
    expected = "an integer" if integer else "a finite number of seconds" if name.endswith("_s") else "a finite number"
    expected += " " + " and ".join(f"{symbol} {bound:g}" for (_, symbol), bound in limits)

    def check(label: str, value: Any) -> object:
        number = isinstance(value, int) if integer else _is_real(value) and math.isfinite(value)
        if isinstance(value, bool) or not number or not all(op(value, bound) for (op, _), bound in limits):
            raise ValueError(f"gradwatch: {label}={value!r} is invalid: expected {expected}")
        return value if integer else float(value)

    return check


def _check_on_alert(label: str, value: object) -> str:
    text = value.strip().lower() if isinstance(value, str) else value
    if text not in ON_ALERT_CHOICES:
        raise ValueError(f"gradwatch: {label}={value!r} is invalid: expected one of {', '.join(ON_ALERT_CHOICES)}")
    return text  # type: ignore[return-value]


def _check_bool(label: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"gradwatch: {label}={value!r} is invalid: expected True or False")
    return value


def _check_name(label: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 256:
        raise ValueError(f"gradwatch: {label}={value!r} is invalid: expected a non-empty string (<= 256 chars)")
    return value.strip()


def _check_job_name(label: str, value: object) -> str:
    if not isinstance(value, str) or len(value) > 256:
        raise ValueError(f"gradwatch: {label}={value!r} is invalid: expected a string (<= 256 chars)")
    return value.strip()


_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9_.\-]+)):(?P<port>[0-9]{1,5})$")


def _check_server(label: str, value: object) -> str:
    match = _HOST_PORT.match(value) if isinstance(value, str) else None
    if match is None or not 1 <= int(match["port"]) <= 65535:
        raise ValueError(
            f"gradwatch: {label}={value!r} is invalid: expected 'host:port' (e.g. 'localhost:50051', "
            "'10.0.0.5:50051', '[::1]:50051') with a port in 1..65535"
        )
    return value  # type: ignore[return-value]


_DNS_PREFIX = "dns:///"


def _check_servers(label: str, value: object) -> tuple[str, ...]:
    """A list of 'host:port' replicas (or a comma-separated string); 'dns:///host:port' expands at connect."""
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items or not all(isinstance(v, str) and v for v in items):
        raise ValueError(
            f"gradwatch: {label}={value!r} is invalid: expected 'host:port' replicas (a list, or comma-separated), "
            "or 'dns:///host:port' for every address a DNS name resolves to"
        )
    for item in items:
        _check_server(label, item.removeprefix(_DNS_PREFIX))
    if len(set(items)) != len(items):
        raise ValueError(f"gradwatch: {label}={value!r} is invalid: a replica is listed twice")
    return tuple(items)


def _check_token(label: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip() or any(c.isspace() for c in value.strip()):
        # The value itself is a secret: never echo it.
        raise ValueError(f"gradwatch: {label} is invalid: expected a non-empty token without whitespace")
    return value.strip()


def _check_path(label: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"gradwatch: {label}={value!r} is invalid: expected a file path")
    return value.strip()


_SNAKE = re.compile(r"[a-z][a-z0-9_]{0,63}")
#: Per-run detector settings an agent may send (the server enforces its own, equal limit).
MAX_DETECTOR_SETTINGS = 64


def _check_detectors(label: str, value: object) -> tuple[tuple[str, str], ...]:
    """{"detector": {"setting": value}} -> sorted ("detector.setting", JSON) pairs. Only the shape is checked
    here (snake_case names, JSON scalars or lists): the server, which knows its detectors, checks names and
    ranges when the run's first stream opens, and refuses the stream with a reason naming the bad key."""
    if not isinstance(value, Mapping):
        raise ValueError(f"gradwatch: {label} must map detector names to {{setting: value}} mappings, got {value!r}")
    pairs: list[tuple[str, str]] = []
    for detector, settings in value.items():
        if not isinstance(detector, str) or not _SNAKE.fullmatch(detector):
            raise ValueError(f"gradwatch: {label}: detector name {detector!r} is not a snake_case name")
        if not isinstance(settings, Mapping):
            raise ValueError(f"gradwatch: {label}.{detector} must be a mapping of settings, got {settings!r}")
        for name, setting_value in settings.items():
            key = f"{detector}.{name}"
            if not isinstance(name, str) or not _SNAKE.fullmatch(name):
                raise ValueError(f"gradwatch: {label}: setting name {key!r} is not a snake_case name")
            scalar = (bool, int, float, str)
            if not isinstance(setting_value, scalar) and not (
                isinstance(setting_value, list | tuple) and all(isinstance(v, scalar) for v in setting_value)
            ):
                raise ValueError(f"gradwatch: {label}.{key} must be a number, a string, a bool or a list of them")
            if isinstance(setting_value, float) and not math.isfinite(setting_value):
                raise ValueError(f"gradwatch: {label}.{key} must be finite, got {setting_value!r}")
            pairs.append((key, json.dumps(list(setting_value) if isinstance(setting_value, tuple) else setting_value)))
    if len(pairs) > MAX_DETECTOR_SETTINGS:
        raise ValueError(f"gradwatch: {label} sets {len(pairs)} detector settings; at most {MAX_DETECTOR_SETTINGS}")
    return tuple(sorted(pairs))


def _env_json(label: str, text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"gradwatch: {label} is not valid JSON: {exc}") from None


def _check_retry(label: str, value: object) -> RetryPolicy:
    if not isinstance(value, RetryPolicy):
        raise ValueError(f"gradwatch: {label}={value!r} is invalid: expected a gradwatch RetryPolicy")
    return value


def _env_number(kind: type) -> Callable[[str, str], object]:
    """Parse an environment string as `kind`; the keyword check then validates the range."""

    def parse(label: str, text: str) -> object:
        try:
            return kind(text.strip())
        except ValueError:
            raise ValueError(
                f"gradwatch: {label}={text!r} is invalid: expected {'an integer' if kind is int else 'a number'}"
            ) from None

    return parse


def _env_text(label: str, text: str) -> object:
    return text


def _env_bool(label: str, text: str) -> object:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"gradwatch: {label}={text!r} is invalid: expected 1/true/yes/on or 0/false/no/off")


@dataclass(frozen=True)
class _Option:
    """One keyword option: its environment variable and its check (which also normalises)."""

    env: str | None
    check: Callable[[str, object], object]
    parse_env: Callable[[str, str], object] = _env_text


_OPTIONS: dict[str, _Option] = {
    "server": _Option(ENV_SERVER, _check_server),
    "servers": _Option(ENV_SERVERS, _check_servers),
    "token": _Option(ENV_TOKEN, _check_token),
    "token_file": _Option(ENV_TOKEN_FILE, _check_path),
    "tls": _Option(ENV_TLS, _check_bool, _env_bool),
    "tls_ca_file": _Option(ENV_TLS_CA_FILE, _check_path),
    "tls_client_cert_file": _Option(ENV_TLS_CLIENT_CERT_FILE, _check_path),
    "tls_client_key_file": _Option(ENV_TLS_CLIENT_KEY_FILE, _check_path),
    "run": _Option(ENV_RUN, _check_name),
    "job_name": _Option(ENV_JOB_NAME, _check_job_name),
    "full_stats_interval": _Option(ENV_FULL_STATS_INTERVAL, _ranged("full_stats_interval"), _env_number(int)),
    "enabled": _Option(None, _check_bool),  # its environment side is the kill switch
    "replay_buffer_size": _Option(ENV_REPLAY_BUFFER_SIZE, _ranged("replay_buffer_size"), _env_number(int)),
    "queue_size": _Option(ENV_QUEUE_SIZE, _ranged("queue_size"), _env_number(int)),
    "heartbeat_interval_s": _Option(ENV_HEARTBEAT_INTERVAL_S, _ranged("heartbeat_interval_s"), _env_number(float)),
    "welcome_timeout_s": _Option(ENV_WELCOME_TIMEOUT_S, _ranged("welcome_timeout_s"), _env_number(float)),
    "exit_flush_timeout_s": _Option(ENV_EXIT_FLUSH_TIMEOUT_S, _ranged("exit_flush_timeout_s"), _env_number(float)),
    "grad_accumulation": _Option(ENV_GRAD_ACCUMULATION, _check_bool, _env_bool),
    "forward_hooks": _Option(ENV_FORWARD_HOOKS, _check_bool, _env_bool),
    "track_collectives": _Option(ENV_TRACK_COLLECTIVES, _check_bool, _env_bool),
    "ddp_comm_hook": _Option(ENV_DDP_COMM_HOOK, _check_bool, _env_bool),
    "overhead_budget": _Option(ENV_OVERHEAD_BUDGET, _ranged("overhead_budget"), _env_number(float)),
    "on_alert": _Option(ENV_ON_ALERT, _check_on_alert),
    "detectors": _Option(ENV_DETECTORS, _check_detectors, _env_json),
    "guard": _Option(ENV_GUARD, check_guard, parse_guard_env),
    "retry": _Option(None, _check_retry),
    "rank": _Option(ENV_RANK, _ranged("rank"), _env_number(int)),
    "world_size": _Option(ENV_WORLD_SIZE, _ranged("world_size"), _env_number(int)),
    "local_rank": _Option(ENV_LOCAL_RANK, _ranged("local_rank"), _env_number(int)),
}
OPTION_NAMES: tuple[str, ...] = tuple(sorted(_OPTIONS))
#: Options whose AgentConfig field has another name.
_FIELDS = {"run": "run_id", "detectors": "detector_settings"}
#: attach()'s keywords that are objects, not settings (no environment variable): named in the option error too.
ATTACH_OBJECTS: tuple[str, ...] = ("alert_callback", "grad_scaler", "rollback_callback")


def _lookup(name: str, options: Mapping[str, object], env: Mapping[str, str]) -> Any:
    """The checked value of option `name` from the keyword, else its env var; None when neither is set."""
    spec = _OPTIONS[name]
    if options.get(name) is not None:
        return spec.check(f"option {name}", options[name])
    if spec.env is not None and env.get(spec.env, "").strip():
        return spec.check(spec.env, spec.parse_env(spec.env, env[spec.env]))
    return None


def _distributed_identity() -> tuple[int, int] | None:
    """(rank, world_size) from torch.distributed when a process group is initialised."""
    try:
        import torch.distributed as dist
    except ImportError:  # a torch build without distributed support
        return None
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None


def resolve_config(options: Mapping[str, object], env: Mapping[str, str] | None = None) -> AgentConfig:
    """Check `options` (attach keywords) and the environment; return the settings or raise ValueError.

    Unknown option names, wrong types, out-of-range values and malformed addresses all raise a ValueError
    that names the option (or variable) and the accepted values.
    """
    env = os.environ if env is None else env
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ValueError(
            f"gradwatch: unknown option(s) {', '.join(unknown)}; accepted options: "
            f"{', '.join(sorted((*OPTION_NAMES, *ATTACH_OBJECTS)))}"
        )
    values = {name: _lookup(name, options, env) for name in _OPTIONS}

    retry = values["retry"] or RetryPolicy()
    if values["retry"] is None and (env.get(ENV_RETRY_INITIAL_BACKOFF_S) or env.get(ENV_RETRY_MAX_BACKOFF_S)):
        initial, maximum = (
            _check_positive_float(name, _env_number(float)(name, env.get(name) or str(default)))
            for name, default in ((ENV_RETRY_INITIAL_BACKOFF_S, retry.initial_backoff_s),
                                  (ENV_RETRY_MAX_BACKOFF_S, retry.max_backoff_s))
        )  # fmt: skip
        retry = RetryPolicy(initial_backoff_s=initial, max_backoff_s=maximum)

    # Keywords beat torch.distributed, which beats the launcher's environment variables.
    group = _distributed_identity()
    rank = _pick(options.get("rank"), group and group[0], values["rank"], 0)
    world_size = _pick(options.get("world_size"), group and group[1], values["world_size"], 1)
    local_rank = values["local_rank"] if values["local_rank"] is not None else 0
    if rank >= world_size:
        raise ValueError(
            f"gradwatch: rank={rank} is invalid for world_size={world_size}: expected 0 <= rank < world_size"
        )

    if values["server"] is not None and values["servers"] is not None:
        raise ValueError(
            f"gradwatch: set server ({ENV_SERVER}) or servers ({ENV_SERVERS}), not both: servers lists every replica"
        )
    if values["token"] is not None and values["token_file"] is not None:
        raise ValueError(f"gradwatch: set token ({ENV_TOKEN}) or token_file ({ENV_TOKEN_FILE}), not both")
    if (values["tls_client_cert_file"] is None) != (values["tls_client_key_file"] is None):
        raise ValueError(
            "gradwatch: tls_client_cert_file and tls_client_key_file are set together "
            f"({ENV_TLS_CLIENT_CERT_FILE}, {ENV_TLS_CLIENT_KEY_FILE})"
        )
    tls_files = (values["tls_ca_file"], values["tls_client_cert_file"])
    if values["tls"] is False and any(f is not None for f in tls_files):
        raise ValueError("gradwatch: tls=False contradicts the tls_* files given; drop one")
    tls = bool(values["tls"]) or any(f is not None for f in tls_files)

    # An option left unset takes AgentConfig's default; the values derived above replace theirs.
    given = {_FIELDS.get(name, name): value for name, value in values.items() if value is not None}
    given.update(tls=tls, run_id=values["run"] or _fallback_run_id(env), retry=retry, rank=rank,
                 world_size=world_size, local_rank=local_rank)  # fmt: skip
    return AgentConfig(**given)


def _pick(keyword: object, from_group: int | None, from_env: int | None, default: int) -> int:
    for candidate in (keyword, from_group, from_env):
        if candidate is not None:
            return int(candidate)  # type: ignore[call-overload]
    return default


def _fallback_run_id(env: Mapping[str, str]) -> str:
    """TORCHELASTIC_RUN_ID (shared by all ranks under torchrun), else "<hostname>-<pid>" (one process)."""
    elastic = env.get(ENV_TORCHELASTIC_RUN_ID, "").strip()
    # torchrun's default run id "none" is not unique across jobs: fall through.
    if elastic and elastic.lower() != "none":
        return elastic
    return f"{socket.gethostname()}-{os.getpid()}"
