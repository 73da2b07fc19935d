"""Per-board daemon configs: strict TOML, overrides flag > env > file, refusals naming file and field."""

from __future__ import annotations

import pytest

from edgesplit.firmware_configs.config import detect_board, list_boards, load_config
from edgesplit.runtime.errors import ConfigError


def test_every_board_loads():
    assert set(list_boards()) == {"host", "rpi-zero-2w", "rpi4-4gb", "rpi5-8gb", "jetson-orin-nano"}
    for board in list_boards():
        cfg = load_config(board, env={})
        assert cfg.board == board and cfg.host == "127.0.0.1" and cfg.cloud_endpoints
        assert cfg.thermal.hard_limit_c > cfg.thermal.soft_limit_c


def test_precedence_flag_over_env_over_file():
    base = load_config("host", env={})
    env = {"EDGESPLIT_PORT": "8500", "EDGESPLIT_THREADS": "1", "EDGESPLIT_CLOUD_ENDPOINTS": "tcp://a:1,tcp://b:2"}
    cfg = load_config("host", flags={"port": "9000", "host": None}, env=env)
    assert (base.port, cfg.port, cfg.threads) == (8080, 9000, 1)
    assert cfg.cloud_endpoints == ("tcp://a:1", "tcp://b:2") and cfg.host == base.host
    assert "EDGESPLIT_PORT" in cfg.source and "--port" in cfg.source


def test_auto_board_from_the_device_tree(tmp_path):
    model = tmp_path / "model"
    model.write_bytes(b"Raspberry Pi 4 Model B Rev 1.4\0")
    assert detect_board(model) == "rpi4-4gb"
    assert load_config("auto", env={}, model_file=model).board == "rpi4-4gb"
    model.write_bytes(b"Some Other Board\0")
    with pytest.raises(ConfigError, match="no built-in config matches .* 'Some Other Board'"):
        detect_board(model)
    with pytest.raises(ConfigError, match="cannot read"):
        detect_board(tmp_path / "missing")


@pytest.mark.parametrize("edit, message", [
    (("port = 8080", "port = 8080\nspeed = 3"), "unknown field 'speed'"),
    (("threads = 2", ""), "missing field 'threads'"),
    (("threads = 2", "threads = \"two\""), "field 'threads' = 'two' must be an integer"),
    (("memory_budget_mb = 2000.0", "memory_budget_mb = -1.0"), "field 'memory_budget_mb'"),
    (("port = 8080", "port = 70000"), "field 'port' = 70000 must be in 1..65535"),
    (("host = \"127.0.0.1\"", "host = \"0.0.0.0\""), "listens beyond this machine without an api_key"),
    (("soft_limit_c = 85.0", "soft_limit_c = 99.0"), "hard_limit_c 95.0 must be above soft_limit_c 99.0"),
    (("log_level = \"info\"", "log_level = \"noisy\""), "'noisy' is not one of"),
    (("model = \"smollm2-135m\"", "model = \"smollm2-135m\"\ndevice_key_file = \"/nonexistent.key_secret\"\n"
      "cloud_key_file = \"/nonexistent.key\""), "device_key_file' = '/nonexistent.key_secret': file not found"),
])
def test_bad_configs_name_file_and_field(tmp_path, edit, message):
    from importlib import resources

    text = resources.files("edgesplit.firmware_configs").joinpath("host.toml").read_text()
    assert edit[0] in text
    path = tmp_path / "board.toml"
    path.write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(ConfigError, match=message) as exc:
        load_config(path, env={})
    assert str(path) in str(exc.value)


def test_a_bad_override_names_the_variable():
    with pytest.raises(ConfigError, match="EDGESPLIT_PORT = 'abc' must be a number"):
        load_config("host", env={"EDGESPLIT_PORT": "abc"})
    with pytest.raises(ConfigError, match="listens beyond this machine"):
        load_config("host", flags={"host": "0.0.0.0"}, env={})
    assert load_config("host", flags={"host": "0.0.0.0", "api_key": "s3cret"}, env={}).api_key == "s3cret"
