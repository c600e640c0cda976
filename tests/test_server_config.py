"""ServerConfig: documented defaults, YAML loading, errors naming the key, env and argument precedence."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from gradwatch.server.config import (
    ENV_CONFIG,
    ENV_GRPC_PORT,
    ENV_HTTP_PORT,
    LimitsConfig,
    ServerConfig,
    config_from_args,
    load_config,
    load_config_file,
)
from gradwatch.server.detectors import REGISTRY


def test_config_defaults_match_the_contract() -> None:
    config = ServerConfig()
    assert (config.grpc.host, config.grpc.port) == ("0.0.0.0", 50051)
    assert (config.http.host, config.http.port) == ("0.0.0.0", 9400)
    assert config.limits.max_message_bytes == 4 * 1024 * 1024
    assert config.limits.max_runs == 1000
    assert config.limits.grpc_receive_bytes > config.limits.max_message_bytes
    assert set(config.detectors) == {spec.name for spec in REGISTRY}
    assert config.detector("non_finite").resolve_after == 20  # type: ignore[attr-defined]


def test_config_every_setting_is_documented() -> None:
    classes = [type(ServerConfig().grpc), type(ServerConfig().http), LimitsConfig]
    classes += [spec.config_type for spec in REGISTRY]
    for cls in classes:
        for name, (_, doc) in cls.describe().items():
            assert doc, f"{cls.__name__}.{name} has no doc"


def test_config_yaml_file_overrides_defaults(tmp_path: Path) -> None:
    path = tmp_path / "gradwatch.yaml"
    path.write_text("grpc: {port: 6000}\nlimits:\n  max_runs: 7\ndetectors:\n  exploding_gradient: {factor: 20}\n")
    config = load_config_file(path)
    assert config.grpc.port == 6000 and config.grpc.host == "0.0.0.0"
    assert config.limits.max_runs == 7
    assert config.detector("exploding_gradient").factor == 20.0  # type: ignore[attr-defined]
    assert config.detector("non_finite").resolve_after == 20  # type: ignore[attr-defined]


def test_config_empty_yaml_file_means_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config_file(path) == dataclasses.replace(ServerConfig(), detectors=load_config_file(path).detectors)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"limits": {"max_runz": 1}}, "'limits.max_runz': unknown setting"),
        ({"grpc": {"port": "fast"}}, "'grpc.port': must be an integer"),
        ({"grpc": {"port": 70000}}, "'grpc.port': must be ≤ 65535"),
        ({"limits": {"max_runs": 0}}, "'limits.max_runs': must be ≥ 1"),
        ({"limits": {"max_runs": True}}, "'limits.max_runs': must be an integer"),
        ({"shutdown_grace_s": -1}, "'shutdown_grace_s': must be ≥ 0"),
        ({"detectors": {"nope": {}}}, "'detectors.nope': unknown detector"),
        ({"detectors": {"non_finite": {"resolve_after": 0}}}, "'detectors.non_finite.resolve_after'"),
        ({"detectors": {"non_finite": {"enabled": "yes"}}}, "'detectors.non_finite.enabled': must be true or false"),
        ({"detectors": {"exploding_gradient": {"min_reports": 500}}}, "min_reports': must be ≤ window"),
        ({"limits": [1, 2]}, "'limits': must be a mapping"),
        ([1, 2], "must be a mapping"),
        ({"bogus": 1}, "'bogus': unknown setting"),
    ],
)
def test_config_errors_name_the_key(data: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        load_config(data)
    assert message in str(info.value)


def test_config_invalid_yaml_and_missing_file_are_value_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("grpc: [unclosed\n")
    with pytest.raises(ValueError, match="invalid YAML"):
        load_config_file(bad)
    with pytest.raises(ValueError, match="cannot read config file"):
        load_config_file(tmp_path / "missing.yaml")


def test_config_from_args_precedence_file_env_args(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("grpc: {port: 1111}\nhttp: {port: 2222}\nlimits: {max_runs: 5}\n")
    env = {ENV_CONFIG: str(path), ENV_GRPC_PORT: "3333"}
    config = config_from_args(http_port=4444, environ=env)
    assert config.grpc.port == 3333  # env beats the file
    assert config.http.port == 4444  # the argument beats the file
    assert config.limits.max_runs == 5  # the file via $GRADWATCH_CONFIG
    assert config_from_args(grpc_port=0, environ=env).grpc.port == 0


def test_config_from_args_bad_env_and_args_are_value_errors() -> None:
    with pytest.raises(ValueError, match=ENV_HTTP_PORT):
        config_from_args(environ={ENV_HTTP_PORT: "eighty"})
    with pytest.raises(ValueError, match=ENV_GRPC_PORT):
        config_from_args(environ={ENV_GRPC_PORT: "-5"})
    with pytest.raises(ValueError, match="grpc_port"):
        config_from_args(grpc_port=99999, environ={})


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        ServerConfig().grpc.port = 1  # type: ignore[misc]


def test_config_from_args_host_binds_both_and_local_is_loopback() -> None:
    config = config_from_args(host="127.0.0.2", http_host="127.0.0.3", environ={})
    assert (config.grpc.host, config.http.host) == ("127.0.0.2", "127.0.0.3")
    local = ServerConfig.local()
    assert (local.grpc.host, local.grpc.port, local.http.host, local.http.port) == ("127.0.0.1", 0, "127.0.0.1", 0)
