"""Device and cloud profiles: the built-ins load, bad files are refused naming file, field and value."""

from __future__ import annotations

from importlib import resources

import pytest

from edgesplit.profiles.cloud import list_cloud_profiles, load_cloud_profile
from edgesplit.profiles.device import list_device_profiles, load_device_profile
from edgesplit.profiles.toml_fields import to_toml, tomllib
from edgesplit.runtime.errors import ConfigError

DEVICES = {"rpi-zero-2w", "rpi4-4gb", "rpi5-8gb", "jetson-orin-nano", "android-flagship", "android-midrange", "host"}


def test_builtin_devices_load_and_datasheets_scale_the_measured_host():
    assert DEVICES <= set(list_device_profiles())
    host = load_device_profile("host")
    assert host.kind == "measured" and host.figures.n_layers == 30
    for name in DEVICES - {"host"}:
        p = load_device_profile(name)
        assert p.kind == "datasheet" and p.reference == "host"
        assert p.figures == host.figures  # per-layer figures are the reference's
        assert 0 < p.usable_memory_mb <= p.total_memory_mb
        assert p.flash_rand_4k_read_mb_s < p.flash_rand_32k_read_mb_s < p.flash_seq_read_mb_s


def test_builtin_clouds_load():
    names = set(list_cloud_profiles())
    assert {"cpu-server", "gpu-t4", "gpu-a100", "host"} <= names
    assert load_cloud_profile("gpu-a100").decode_time_factor < load_cloud_profile("cpu-server").decode_time_factor


def _datasheet(**over) -> str:
    fields = dict(name='"x"', description='"d"', source='"s"', kind='"datasheet"', reference='"host"',
                  decode_time_factor="2.0", prefill_time_factor="3.0", total_memory_mb="1000.0",
                  usable_memory_mb="500.0", threads="4", flash_seq_read_mb_s="40.0", flash_rand_4k_read_mb_s="4.0",
                  flash_rand_32k_read_mb_s="15.0")
    fields.update(over)
    return "\n".join(f"{k} = {v}" for k, v in fields.items() if v is not None) + "\n"


@pytest.mark.parametrize("over, words", [
    (dict(colour='"red"'), ["unknown field 'colour'", "'red'"]),
    (dict(threads=None), ["missing field 'threads'"]),
    (dict(decode_time_factor='"fast"'), ["'decode_time_factor'", "'fast'", "must be a number"]),
    (dict(usable_memory_mb="-5.0"), ["'usable_memory_mb'", "-5.0", "must be >"]),
    (dict(usable_memory_mb="2000.0"), ["'usable_memory_mb'", "exceeds total_memory_mb"]),
    (dict(kind='"guessed"'), ["'kind'", "'guessed'", "measured, datasheet"]),
    (dict(reference=None), ["kind 'datasheet' needs field 'reference'"]),
    (dict(reference='"rpi4-4gb"'), ["'reference'", "'rpi4-4gb'", "not a measured profile"]),
    (dict(threads="2.5"), ["'threads'", "2.5", "integer"]),
])
def test_bad_device_files_name_file_field_and_value(tmp_path, over, words):
    path = tmp_path / "dev.toml"
    path.write_text(_datasheet(**over))
    with pytest.raises(ConfigError) as err:
        load_device_profile(path)
    msg = str(err.value)
    assert str(path) in msg
    for w in words:
        assert w in msg


def test_a_good_datasheet_file_loads_by_path(tmp_path):
    path = tmp_path / "dev.toml"
    path.write_text(_datasheet())
    p = load_device_profile(path)
    assert (p.name, p.decode_time_factor, p.threads) == ("x", 2.0, 4)


def test_unknown_names_and_bad_toml_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown name 'nope'.*rpi4-4gb"):
        load_device_profile("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_device_profile(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_cloud_profile(tmp_path / "missing.toml")


def test_measured_profile_round_trips_through_toml_and_checks_lengths(tmp_path):
    src = resources.files("edgesplit.profiles.devices") / "host.toml"
    data = tomllib.loads(src.read_text())
    path = tmp_path / "host2.toml"
    path.write_text(to_toml(data))
    assert load_device_profile(path).figures == load_device_profile("host").figures
    data["measured"]["layers"]["q4"]["decode_ms"] = [1.0]  # one value for three context lengths
    path.write_text(to_toml(data))
    with pytest.raises(ConfigError, match=r"measured.layers.q4.*'decode_ms' has 1 values"):
        load_device_profile(path)
    data["measured"]["layers"]["q5"] = data["measured"]["layers"].pop("q4")
    path.write_text(to_toml(data))
    with pytest.raises(ConfigError, match="unknown key 'q5'"):
        load_device_profile(path)


def test_bad_cloud_file_names_the_field(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('name = "c"\ndescription = "d"\nsource = "s"\nreference = "host"\ndecode_time_factor = 0.0\n'
                    'prefill_time_factor = 1.0\nstep_floor_ms = 0.0\nmemory_gb = 1.0\n')
    with pytest.raises(ConfigError, match=r"c.toml.*'decode_time_factor' = 0.0 must be > 0"):
        load_cloud_profile(path)
