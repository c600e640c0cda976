"""attach() is loud about bad configuration; the environment configures it; the kill switch turns it off."""

from __future__ import annotations

import inspect
import os
import socket
import subprocess
import sys
import textwrap
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from agent_support import make_mlp  # noqa: E402
from gradwatch.agent import dispatch  # noqa: E402
from gradwatch.agent.config import AgentConfig, RetryPolicy, resolve_config  # noqa: E402
from gradwatch.agent.monitor import AgentMonitor, Monitor, NoopMonitor, attach  # noqa: E402

# Every GRADWATCH_* variable and launcher variable the agent reads: cleared so the host cannot leak in.
_ENV_VARS = [
    "GRADWATCH_SERVER", "GRADWATCH_RUN", "GRADWATCH_JOB_NAME", "GRADWATCH_FULL_STATS_INTERVAL",
    "GRADWATCH_DISABLED", "GRADWATCH_REPLAY_BUFFER_SIZE", "GRADWATCH_QUEUE_SIZE", "GRADWATCH_HEARTBEAT_INTERVAL_S",
    "GRADWATCH_WELCOME_TIMEOUT_S", "GRADWATCH_EXIT_FLUSH_TIMEOUT_S", "GRADWATCH_RETRY_INITIAL_BACKOFF_S",
    "GRADWATCH_RETRY_MAX_BACKOFF_S", "TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"full_stats_interval": 0}, r"full_stats_interval=0 .*integer > 0"),
        ({"full_stats_interval": -3}, r"full_stats_interval=-3"),
        ({"full_stats_interval": 2.5}, r"full_stats_interval=2.5 .*integer"),
        ({"full_stats_interval": True}, r"full_stats_interval=True"),
        ({"full_stats_interval": "10"}, r"full_stats_interval='10'"),
        ({"server": "localhost"}, r"server='localhost' .*host:port"),
        ({"server": "localhost:0"}, r"port in 1..65535"),
        ({"server": "localhost:99999"}, r"port in 1..65535"),
        ({"server": "http://x:1"}, r"host:port"),
        ({"server": 50051}, r"server=50051"),
        ({"run": ""}, r"run='' .*non-empty string"),
        ({"run": 7}, r"run=7"),
        ({"job_name": ["a"]}, r"job_name=\['a'\]"),
        ({"enabled": "yes"}, r"enabled='yes' .*True or False"),
        ({"replay_buffer_size": 0}, r"replay_buffer_size=0"),
        ({"queue_size": -1}, r"queue_size=-1"),
        ({"heartbeat_interval_s": 0}, r"heartbeat_interval_s=0 .*seconds > 0"),
        ({"heartbeat_interval_s": float("nan")}, r"heartbeat_interval_s=nan"),
        ({"welcome_timeout_s": "5"}, r"welcome_timeout_s='5'"),
        ({"exit_flush_timeout_s": -1.0}, r"exit_flush_timeout_s=-1.0"),
        ({"retry": {"initial_backoff_s": 1}}, r"retry=.*RetryPolicy"),
        ({"rank": -1}, r"rank=-1 .*>= 0"),
        ({"world_size": 0}, r"world_size=0"),
        ({"rank": 2, "world_size": 2}, r"rank=2 is invalid for world_size=2"),
        ({"local_rank": "0"}, r"local_rank='0'"),
        ({"full_stats_intervall": 5}, r"unknown option\(s\) full_stats_intervall; accepted options: .*interval"),
    ],
)  # fmt: skip
def test_attach_rejects_bad_option(options: dict[str, Any], message: str) -> None:
    model = make_mlp()
    with pytest.raises(ValueError, match=message):
        attach(model, torch.optim.SGD(model.parameters(), lr=0.1), **options)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("GRADWATCH_SERVER", "nope", r"GRADWATCH_SERVER='nope' .*host:port"),
        ("GRADWATCH_FULL_STATS_INTERVAL", "ten", r"GRADWATCH_FULL_STATS_INTERVAL='ten' .*integer"),
        ("GRADWATCH_FULL_STATS_INTERVAL", "0", r"GRADWATCH_FULL_STATS_INTERVAL=0 .*> 0"),
        ("GRADWATCH_HEARTBEAT_INTERVAL_S", "-1", r"GRADWATCH_HEARTBEAT_INTERVAL_S=-1.0"),
        ("GRADWATCH_REPLAY_BUFFER_SIZE", "1.5", r"GRADWATCH_REPLAY_BUFFER_SIZE='1.5'"),
        ("GRADWATCH_DISABLED", "maybe", r"GRADWATCH_DISABLED='maybe' .*1/true/yes/on"),
        ("GRADWATCH_RETRY_MAX_BACKOFF_S", "0", r"GRADWATCH_RETRY_MAX_BACKOFF_S=0.0"),
        ("RANK", "x", r"RANK='x' .*integer"),
    ],
)
def test_attach_rejects_bad_environment_value(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=message):
        attach(make_mlp())


def test_attach_rejects_a_model_that_is_not_a_module_and_a_foreign_optimizer() -> None:
    with pytest.raises(ValueError, match=r"model must be a torch.nn.Module, got dict"):
        attach({"weights": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"optimizer must be a torch.optim.Optimizer or None, got list"):
        attach(make_mlp(), [torch.zeros(3)])
    with pytest.raises(ValueError, match=r"no parameters"):
        attach(torch.nn.ReLU())
    with pytest.raises(ValueError, match=r"uninitialised \(lazy\) parameters"):
        attach(torch.nn.LazyLinear(4))


def test_retry_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match=r"retry.multiplier"):
        RetryPolicy(multiplier=0.5)
    with pytest.raises(ValueError, match=r"retry.jitter"):
        RetryPolicy(jitter=1.5)
    with pytest.raises(ValueError, match=r"retry.max_backoff_s \(0.1\) must be >= retry.initial_backoff_s"):
        RetryPolicy(initial_backoff_s=1.0, max_backoff_s=0.1)


def test_config_defaults_are_documented_values() -> None:
    config = resolve_config({}, env={})
    assert config.server == "localhost:50051"
    assert config.run_id == f"{socket.gethostname()}-{os.getpid()}"
    assert (config.full_stats_interval, config.replay_buffer_size, config.heartbeat_interval_s) == (10, 1024, 5.0)
    assert (config.rank, config.world_size, config.local_rank) == (0, 1, 0)
    assert config.retry == RetryPolicy(initial_backoff_s=0.5, multiplier=1.6, max_backoff_s=30.0, jitter=0.2)
    assert config.enabled and isinstance(config, AgentConfig)


def test_config_from_environment_and_keywords_win() -> None:
    env = {
        "GRADWATCH_SERVER": "gw.example:6000",
        "GRADWATCH_RUN": "env-run",
        "GRADWATCH_JOB_NAME": "job",
        "GRADWATCH_FULL_STATS_INTERVAL": "25",
        "GRADWATCH_REPLAY_BUFFER_SIZE": "64",
        "GRADWATCH_HEARTBEAT_INTERVAL_S": "1.5",
        "GRADWATCH_RETRY_INITIAL_BACKOFF_S": "0.1",
        "GRADWATCH_RETRY_MAX_BACKOFF_S": "2",
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
    }
    config = resolve_config({}, env=env)
    assert (config.server, config.run_id, config.job_name) == ("gw.example:6000", "env-run", "job")
    assert (config.full_stats_interval, config.replay_buffer_size, config.heartbeat_interval_s) == (25, 64, 1.5)
    assert (config.retry.initial_backoff_s, config.retry.max_backoff_s) == (0.1, 2.0)
    assert (config.rank, config.world_size, config.local_rank) == (3, 4, 1)
    config = resolve_config({"server": "[::1]:7000", "run": "kw-run", "full_stats_interval": 5, "rank": 0}, env=env)
    assert (config.server, config.run_id, config.full_stats_interval, config.rank) == ("[::1]:7000", "kw-run", 5, 0)


def test_config_run_id_falls_back_to_torchelastic_run_id() -> None:
    assert resolve_config({}, env={"TORCHELASTIC_RUN_ID": "elastic-42"}).run_id == "elastic-42"


def test_enabled_false_returns_a_noop_monitor_with_the_same_api() -> None:
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = attach(model, opt, run="off", enabled=False)
    assert isinstance(monitor, NoopMonitor) and isinstance(monitor, Monitor)
    with monitor as m:
        m.step(torch.tensor(1.0))
        m.event("checkpoint_saved")
    assert monitor.close() is True
    assert monitor.run_id == "off" and monitor.step_count == 1
    assert monitor.counters()["stream_state"] == "disabled"
    assert not dispatch.is_watched(opt) and not dispatch.is_watched(model)


def _public_members(cls: type) -> dict[str, object]:
    """Public name -> "property" or the call signature's parameters (names, kinds, defaults, annotations)."""
    out: dict[str, object] = {}
    for name in dir(cls):
        if name.startswith("_") and name not in ("__enter__", "__exit__"):
            continue
        member = inspect.getattr_static(cls, name)
        if isinstance(member, property):
            out[name] = "property"
        elif callable(member):
            out[name] = [(p.name, p.kind, p.default, str(p.annotation))
                         for p in inspect.signature(member).parameters.values()]  # fmt: skip
    return out


def test_monitor_implementations_expose_the_interface_and_nothing_else() -> None:
    interface = _public_members(Monitor)
    assert {"step", "close", "pause", "stop_requested", "counters"} <= interface.keys()
    for implementation in (AgentMonitor, NoopMonitor):
        assert issubclass(implementation, Monitor) and not implementation.__abstractmethods__
        assert _public_members(implementation) == interface, implementation.__name__
    assert not issubclass(NoopMonitor, AgentMonitor) and not issubclass(AgentMonitor, NoopMonitor)


def test_kill_switch_wins_and_never_imports_grpc_in_a_fresh_interpreter() -> None:
    code = textwrap.dedent(
        """
        import sys, torch, gradwatch
        model = torch.nn.Linear(2, 2)
        # Bad options are not even looked at: the operator's switch wins over code.
        monitor = gradwatch.attach(model, server="not an address", full_stats_interval=0)
        monitor.step(model(torch.ones(1, 2)).sum())
        assert monitor.close() is True, "no-op close"
        print(type(monitor).__name__, "grpc" in sys.modules, "gradwatch.v1.gradwatch_pb2" in sys.modules)
        """
    )
    env = {**os.environ, "GRADWATCH_DISABLED": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["NoopMonitor", "False", "False"]


def test_config_issue3_options_from_environment_keywords_and_defaults() -> None:
    defaults = resolve_config({}, env={})
    assert (defaults.grad_accumulation, defaults.forward_hooks, defaults.overhead_budget, defaults.on_alert) == (
        False, True, 0.01, "observe",
    )  # fmt: skip
    env = {
        "GRADWATCH_GRAD_ACCUMULATION": "yes",
        "GRADWATCH_FORWARD_HOOKS": "off",
        "GRADWATCH_OVERHEAD_BUDGET": "0.05",
        "GRADWATCH_ON_ALERT": "Raise",
    }
    config = resolve_config({}, env=env)
    assert (config.grad_accumulation, config.forward_hooks, config.overhead_budget, config.on_alert) == (
        True, False, 0.05, "raise",
    )  # fmt: skip
    config = resolve_config({"forward_hooks": True, "overhead_budget": 0.0, "on_alert": "flag"}, env=env)
    assert (config.forward_hooks, config.overhead_budget, config.on_alert) == (True, 0.0, "flag")
    for name, value in (("GRADWATCH_GRAD_ACCUMULATION", "maybe"), ("GRADWATCH_OVERHEAD_BUDGET", "2"),
                        ("GRADWATCH_ON_ALERT", "panic")):  # fmt: skip
        with pytest.raises(ValueError, match=name):
            resolve_config({}, env={name: value})


def test_detector_settings_from_keyword_or_json_environment_become_sorted_json_pairs() -> None:
    settings = {"exploding_gradient": {"factor": 20, "mad_k": 5.5}, "frozen_parameters": {"ignore": ("enc.",)}}
    expected = (("exploding_gradient.factor", "20"), ("exploding_gradient.mad_k", "5.5"),
                ("frozen_parameters.ignore", '["enc."]'))  # fmt: skip
    assert resolve_config({"detectors": settings}, env={}).detector_settings == expected
    env = {"GRADWATCH_DETECTORS": '{"exploding_gradient": {"factor": 20, "mad_k": 5.5}, '
                                  '"frozen_parameters": {"ignore": ["enc."]}}'}  # fmt: skip
    assert resolve_config({}, env=env).detector_settings == expected
    assert resolve_config({}, env={}).detector_settings == ()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([1], "must map detector names"),
        ({"Exploding": {"factor": 2}}, "not a snake_case name"),
        ({"exploding_gradient": 3}, "must be a mapping of settings"),
        ({"exploding_gradient": {"factor": float("nan")}}, "must be finite"),
        ({"exploding_gradient": {"factor": None}}, "must be a number, a string, a bool or a list"),
        ({"non_finite": {f"k{i}": 1 for i in range(65)}}, "at most 64"),
    ],
)
def test_detector_settings_of_the_wrong_shape_fail_at_attach(value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_config({"detectors": value}, env={})
    with pytest.raises(ValueError, match="GRADWATCH_DETECTORS is not valid JSON"):
        resolve_config({}, env={"GRADWATCH_DETECTORS": "{oops"})


def test_attach_option_error_lists_every_keyword_attach_accepts() -> None:
    import inspect

    from gradwatch.agent.config import OPTION_NAMES

    keywords = {
        name for name, p in inspect.signature(attach).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    with pytest.raises(ValueError, match="unknown option") as raised:
        attach(make_mlp(), None, bogus=1)
    listed = set(str(raised.value).split("accepted options: ", 1)[1].split(", "))
    assert listed == set(OPTION_NAMES) | keywords, listed ^ (set(OPTION_NAMES) | keywords)
