"""corrald's start-up checks past the gold image, on a host set up for corrald
(the gold image built, libvirtd running): libvirtd out of reach is one clear
line, and what a crashed corrald leaves does not stop the next one. (The
checks before the image: tests/unit/test_daemon.py.)"""

import socket

from tests.support.corrald import assert_one_clear_line, corrald_check
from tests.support.host import STATE_DIR


def test_libvirtd_not_running(tmp_path):
    done = corrald_check(tmp_path, 'libvirt_uri = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"\n'
                                   f'[daemon]\nendpoint = "ipc://{tmp_path}/c.sock"\n')
    assert_one_clear_line(done, "cannot connect to libvirt", "is libvirtd running?")


def test_stale_endpoint_socket_is_replaced(tmp_path):
    path = tmp_path / "stale.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a crashed corrald leaves
    done = corrald_check(tmp_path, f'state_dir = "{STATE_DIR}"\n[daemon]\nendpoint = "ipc://{path}"\n')
    assert done.returncode == 0, done.stderr
    assert "checks passed" in done.stdout
