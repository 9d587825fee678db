"""The systemd unit (config/corrald.service) is valid for this machine's
systemd: `systemd-analyze verify` accepts it with its paths pointed at this
checkout (no unknown keys, executables present)."""

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_unit_file_verifies(tmp_path):
    unit = tmp_path / "corrald.service"
    unit.write_text((REPO / "config" / "corrald.service").read_text().replace("/opt/corral", str(REPO)))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                          timeout=60)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_unit_stops_after_corralds_grace_period():
    import config

    unit = (REPO / "config" / "corrald.service").read_text()
    stop_s = int(next(line for line in unit.splitlines() if line.startswith("TimeoutStopSec="))
                 .split("=")[1])
    # systemd must not SIGKILL a corrald that is still inside its own drain.
    assert stop_s > config.load().daemon.shutdown_grace_s + 60
