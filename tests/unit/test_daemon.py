"""corrald's start-up: each bad precondition is one clear line naming the fix,
never a traceback, and a non-zero exit."""

import socket

import pytest

from tests.support.corrald import corrald_check
from tests.support.host import STATE_DIR


def assert_one_clear_line(done, *fragments):
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    # Log records may come first; the error itself is one line of its own.
    errors = [line for line in done.stderr.splitlines() if line.startswith("corrald: ")]
    assert len(errors) == 1, done.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_config_value_out_of_range(tmp_path):
    done = corrald_check(tmp_path, "[vm]\nmemory_mib = 64\n")
    assert_one_clear_line(done, "corrald: config: vm.memory_mib = 64 is out of range (128..")


def test_missing_guest_image(tmp_path):
    done = corrald_check(tmp_path, f'state_dir = "{tmp_path}"\n'
                                   f'[daemon]\nendpoint = "ipc://{tmp_path}/c.sock"\n')
    assert_one_clear_line(done, "guest image missing", "scripts/build-guest-image")


def test_libvirtd_not_running(tmp_path):
    done = corrald_check(tmp_path, 'libvirt_uri = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"\n'
                                   f'[daemon]\nendpoint = "ipc://{tmp_path}/c.sock"\n')
    assert_one_clear_line(done, "cannot connect to libvirt", "is libvirtd running?")


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


def test_stale_endpoint_socket_is_replaced(tmp_path):
    path = tmp_path / "stale.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a crashed corrald leaves
    done = corrald_check(tmp_path, f'state_dir = "{STATE_DIR}"\n[daemon]\nendpoint = "ipc://{path}"\n')
    assert done.returncode == 0, done.stderr
    assert "checks passed" in done.stdout


@pytest.mark.parametrize("site, fragment", [
    ("[vm]\naccelerator = 'xen'\n", "vm.accelerator = 'xen' must be one of auto, kvm, tcg"),
    ("[pool\n", "is not valid TOML"),
])
def test_other_bad_configs(tmp_path, site, fragment):
    assert_one_clear_line(corrald_check(tmp_path, site), fragment)
