"""A real corrald process, as an operator runs it: its site file, its start,
waiting until it serves, and its start-up checks (`corrald --check`) with the
one clear line a failed one prints."""

import json
import subprocess
import sys
from pathlib import Path

from protocol.client.api import Client
from protocol.client.reach import Unreachable
from tests.support.waiting import wait_until


def write_site_config(tmp: Path, instance: str, **sections) -> Path:
    """A site file for a corrald in `tmp`; `sections` add or change keys (name={key: value})."""
    tables = {"daemon": {"endpoint": f"ipc://{tmp}/corrald.sock", "instance": instance, "shutdown_grace_s": 20.0},
              "control": {"endpoint": f"ipc://{tmp}/control/control.sock"},
              "pool": {"size": 1}, "metrics": {"port": 0}}
    for name, values in sections.items():
        tables[name] = {**tables.get(name, {}), **values}
    site = tmp / "site.toml"
    site.write_text("".join(f"[{name}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items())
                            for name, values in tables.items()))
    return site


def corrald(site: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "actors.daemon", "--config", str(site)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def status_once_up(client: Client):
    """corrald's status, or None while a corrald just started has no socket yet."""
    try:
        return client.status()
    except Unreachable:
        return None


def daemon_ready(endpoint: str, timeout_s: float = 120) -> None:
    with Client(endpoint) as c:
        wait_until(lambda: dict(getattr(status_once_up(c), "pool", ())).get(b"ready") == b"1", timeout_s,
                   "corrald's VM ready")


def corrald_check(tmp_path: Path, site: str) -> subprocess.CompletedProcess:
    """`corrald --check` with `site` as its site file, and its control socket
    in tmp_path: a corrald running on this host holds the default one, and
    the check would stop there. (`site` sets daemon.endpoint where it matters.)"""
    config = tmp_path / "site.toml"
    config.write_text(site + f'[control]\nendpoint = "ipc://{tmp_path}/control.sock"\n')
    return subprocess.run([sys.executable, "-m", "actors.daemon", "--config", str(config), "--check"],
                          capture_output=True, text=True, timeout=60)


def assert_one_clear_line(done, *fragments):
    """corrald refused to start with one line naming the problem (and each of
    `fragments`), never a traceback."""
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    # Log records may come first; the error itself is one line of its own.
    errors = [line for line in done.stderr.splitlines() if line.startswith("corrald: ")]
    assert len(errors) == 1, done.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
