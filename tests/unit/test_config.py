import pytest

import config


def test_defaults_load_and_are_typed():
    cfg = config.load()
    assert cfg.vm.memory_mib == 512
    assert cfg.vm.accelerator == "auto"
    assert cfg.state_dir.is_absolute()
    assert cfg.daemon.endpoint.startswith("ipc://")
    assert (cfg.tasks.stream_window_bytes, cfg.tasks.stream_buffer_bytes) == (256 << 10, 1 << 20)
    assert (cfg.tasks.stream_linger_s, cfg.tasks.max_stdin_bytes) == (30.0, 8 << 20)


def test_site_file_overrides_defaults(tmp_path):
    site = tmp_path / "site.toml"
    site.write_text("[vm]\nmemory_mib = 1024\nboot_timeout_s = 5\n")
    cfg = config.load(site)
    assert cfg.vm.memory_mib == 1024
    assert cfg.vm.boot_timeout_s == 5.0
    assert cfg.vm.vcpus == 1  # untouched keys keep their defaults


@pytest.mark.parametrize("overrides, message", [
    ({"vm": {"memory_mib": 64}}, "config: vm.memory_mib = 64 is out of range (128..1048576)"),
    ({"vm": {"accelerator": "xen"}}, "config: vm.accelerator = 'xen' must be one of auto, kvm, tcg"),
    ({"vm": {"vcpus": "2"}}, "config: vm.vcpus = '2' must be of type int"),
    ({"vm": {"vcpus": True}}, "config: vm.vcpus = True must be of type int"),
    ({"vm": {"tmpfs_size": "lots"}}, "config: vm.tmpfs_size = 'lots' is not a size"),
    ({"vm": {"colour": "red"}}, "config: unknown key vm.colour"),
    ({"vm": 3}, "config: [vm] must be a table"),
    ({"daemon": {"endpoint": "udp://x"}}, "config: daemon.endpoint = 'udp://x' must be an ipc:///path"),
    ({"daemon": {"max_connections": 0}}, "config: daemon.max_connections = 0 is out of range (1..1000000)"),
    ({"control": {"max_connections": 0}}, "config: control.max_connections = 0 is out of range (1..100000)"),
    ({"identity": {"local_grants": "dev:python"}},
     "config: identity.local_grants = 'dev:python' must be a list of strings"),
    ({"identity": {"grants": {"Bad Name": []}}}, "config: identity.grants name = 'Bad Name' must be 1 to 32"),
    ({"identity": {"grants": []}}, "config: [identity.grants] must be a table"),
    ({"budget": {"capability_costs": {"net:egress": -1}}},
     "config: budget.capability_costs.net:egress = -1.0 is out of range (0..1000000000)"),
    ({"budget": {"overrides": {"a": {"capacity": 5.0}}}}, "config: missing key budget.overrides.a.refill_per_s"),
    ({"budget": {"priority_costs": {"urgent": 1.0}}}, "config: unknown key budget.priority_costs.urgent"),
    ({"ioguard": {"max_partial_bytes": 1 << 20}},
     "config: ioguard.max_partial_bytes = 1048576 is out of range (2097152..1099511627776)"),
    ({"tasks": {"stream_window_bytes": 1024}},
     "config: tasks.stream_window_bytes = 1024 is out of range (4096..16777216)"),
    ({"tasks": {"stream_linger_s": -1}}, "config: tasks.stream_linger_s = -1.0 is out of range (0..3600)"),
    ({"tasks": {"max_stdin_bytes": 9 << 20}},
     "config: tasks.max_stdin_bytes = 9437184 is out of range (0..8388608)"),
    ({"tasks": {"stream_buffer_bytes": 128 << 10, "stream_window_bytes": 256 << 10}},
     "config: tasks.stream_buffer_bytes must be at least tasks.stream_window_bytes"),
    # A 10 % quota pauses a busy vCPU up to 0.9 s: an honest frame may span that.
    ({"vm": {"cpu_quota_pct": 10}}, "config: ioguard.frame_stall_s = 1 must be at least twice the longest "
                                    "vCPU pause the CPU quotas allow (0.9 s)"),
])
def test_bad_values_name_the_key_and_the_allowed_range(overrides, message):
    with pytest.raises(config.ConfigError) as error:
        config.load(overrides=overrides)
    assert str(error.value).startswith(message)


def test_bad_toml_and_missing_file_are_clear(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[vm\n")
    with pytest.raises(config.ConfigError, match="is not valid TOML"):
        config.load(bad)
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.load(tmp_path / "absent.toml")


def test_session_defaults_are_those_of_the_design():
    sessions = config.load().sessions
    assert (sessions.max_per_identity, sessions.max_total) == (4, 16)
    assert (sessions.default_idle_s, sessions.max_idle_s) == (300, 3600)
    assert (sessions.default_life_s, sessions.max_life_s) == (3600, 86400)


@pytest.mark.parametrize("sessions, message", [
    ({"max_total": 257}, "config: sessions.max_total = 257 is out of range (0..256)"),
    ({"default_idle_s": 0}, "config: sessions.default_idle_s = 0 is out of range (1..604800)"),
    ({"max_life_s": 1.5}, "config: sessions.max_life_s = 1.5 must be of type int"),
    ({"default_idle_s": 4000}, "config: sessions.default_idle_s = 4000 must not exceed sessions.max_idle_s = 3600"),
    ({"default_life_s": 90000},
     "config: sessions.default_life_s = 90000 must not exceed sessions.max_life_s = 86400"),
    ({"max_per_identity": 20}, "config: sessions.max_per_identity = 20 must not exceed sessions.max_total = 16"),
    ({"idle_s": 5}, "config: unknown key sessions.idle_s"),
])
def test_bad_session_limits_are_refused_at_start(sessions, message):
    with pytest.raises(config.ConfigError) as error:
        config.load(overrides={"sessions": sessions})
    assert str(error.value).startswith(message)


def test_sessions_can_be_turned_off():
    assert config.load(overrides={"sessions": {"max_per_identity": 0, "max_total": 0}}).sessions.max_total == 0
