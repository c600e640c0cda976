"""Storage and recorder settings: defaults, precedence, loud failures at start-up."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from gradwatch.server.config import DEFAULT_DATA_DIR, ENV_DATA_DIR, config_from_args, load_config
from gradwatch.server.database import Database


def test_storage_data_dir_precedence_default_file_env_flag(tmp_path: pathlib.Path) -> None:
    assert config_from_args(environ={}).storage.data_dir == DEFAULT_DATA_DIR
    config_file = tmp_path / "gradwatch.yaml"
    config_file.write_text("storage: {data_dir: /from/file}\nrecorder: {window_reports: 8}\n")
    from_file = config_from_args(config_file=config_file, environ={})
    assert from_file.storage.data_dir == "/from/file" and from_file.recorder.window_reports == 8
    from_env = config_from_args(config_file=config_file, environ={ENV_DATA_DIR: "/from/env"})
    assert from_env.storage.data_dir == "/from/env"
    flag = config_from_args(config_file=config_file, environ={ENV_DATA_DIR: "/from/env"}, data_dir="/from/flag")
    assert flag.storage.data_dir == "/from/flag"
    assert load_config(None).storage.data_dir == ""  # an embedded ServerApp keeps it in memory


@pytest.mark.parametrize(
    ("yaml_doc", "key"),
    [
        ({"recorder": {"window_reports": 0}}, "recorder.window_reports"),
        ({"recorder": {"sliding": True}}, "recorder.sliding"),
        ({"storage": {"max_incident_bytes": 10}}, "storage.max_incident_bytes"),
    ],
)
def test_storage_and_recorder_bad_settings_name_the_key(yaml_doc: dict[str, object], key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(yaml_doc)


def test_serve_with_an_unusable_data_dir_exits_2_naming_it(tmp_path: pathlib.Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gradwatch",
            "serve",
            "--grpc-port",
            "0",
            "--http-port",
            "0",
            "--data-dir",
            str(blocker / "data"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2 and "storage.data_dir" in result.stderr, result.stderr


def test_database_reopens_with_its_rows(tmp_path: pathlib.Path) -> None:
    from gradwatch.server.config import StorageConfig

    db = Database(StorageConfig(data_dir=str(tmp_path)), alert_history=10)
    db.put_run(
        {
            "run_id": "r",
            "job_name": "j",
            "world_size": 2,
            "first_seen": 1.0,
            "last_seen": 2.0,
            "finished_at": None,
            "protocol_version": 1,
            "summary": {"step": 7},
        }
    )
    db.close()
    again = Database(StorageConfig(data_dir=str(tmp_path)), alert_history=10)
    assert again.run("r") == {
        "run_id": "r",
        "job_name": "j",
        "world_size": 2,
        "first_seen": 1.0,
        "last_seen": 2.0,
        "finished_at": None,
        "protocol_version": 1,
        "summary": {"step": 7},
    }
    assert again.counts() == {"runs": 1, "alerts": 0, "incidents": 0}
