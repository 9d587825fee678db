"""corrald's start-up: each bad precondition is one clear line naming the fix,
never a traceback, and a non-zero exit. (The checks past the gold image, on a
host set up for corrald: tests/vm/test_daemon.py.)"""

import socket

import pytest

from tests.support.corrald import assert_one_clear_line, corrald_check


def test_config_value_out_of_range(tmp_path):
    done = corrald_check(tmp_path, "[vm]\nmemory_mib = 64\n")
    assert_one_clear_line(done, "corrald: config: vm.memory_mib = 64 is out of range (128..")


def test_missing_guest_image(tmp_path):
    done = corrald_check(tmp_path, f'state_dir = "{tmp_path}"\n'
                                   f'[daemon]\nendpoint = "ipc://{tmp_path}/c.sock"\n')
    assert_one_clear_line(done, "guest image missing", "scripts/build-guest-image")


def test_endpoint_in_use(tmp_path):
    path = tmp_path / "busy.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    try:
        done = corrald_check(tmp_path, f'[daemon]\nendpoint = "ipc://{path}"\n')
    finally:
        listener.close()
    assert_one_clear_line(done, f"endpoint ipc://{path} is in use", "daemon.endpoint")


@pytest.mark.parametrize("site, fragment", [
    ("[vm]\naccelerator = 'xen'\n", "vm.accelerator = 'xen' must be one of auto, kvm, tcg"),
    ("[pool\n", "is not valid TOML"),
])
def test_other_bad_configs(tmp_path, site, fragment):
    assert_one_clear_line(corrald_check(tmp_path, site), fragment)
