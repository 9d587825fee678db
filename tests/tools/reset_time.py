"""Reset time of the guest agent, on one real VM of the checkout it runs from
(its gold image and agent ISO, built first with guest.image.build). Not run in CI:

    python -m tests.tools.reset_time --resets 20

Prints the median, min and max time from sending Reset to ResetDone, over
`--resets` resets each after a task that did nothing (`true`), one that wrote a
little in /tmp and the home, and one that touched the kernel keyrings. To
compare with another checkout (main, say), copy this file into its tests/tools/ and
run it there, back to back on the same machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import config
from actors.vm.host import Hypervisor
from tests.support.host import STATE_DIR, TEST_INSTANCE
from tests.support.vm import BootedVm

TASKS = {
    "true": ["true"],
    "writes": ["sh", "-c", "echo x > /tmp/f; mkdir -p ~/d; echo y > ~/d/g"],
    # KEYCTL_GET_KEYRING_ID(thread keyring, create), then KEYCTL_GET_PERSISTENT into it.
    "keys": ["python3", "-c", "import ctypes; libc = ctypes.CDLL(None); "
             "libc.syscall(250, 0, -1, 1); libc.syscall(250, 22, -1, -1)"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resets", type=int, default=20)
    args = parser.parse_args()
    cfg = config.load(overrides={"state_dir": str(STATE_DIR), "daemon": {"instance": f"{TEST_INSTANCE}rt"[:16]}})
    hypervisor = Hypervisor.from_config(cfg)
    vm = BootedVm(hypervisor, cfg.vm.boot_timeout_s)
    try:
        def reset_ms() -> float:
            started = time.monotonic()
            done = vm.link.reset(started + 30)
            assert done.ok, done.detail
            return (time.monotonic() - started) * 1000

        for _ in range(3):  # warm up: TCG translates the reset path once
            vm.run(*TASKS["writes"])
            reset_ms()
        for name, argv in TASKS.items():
            times = []
            for _ in range(args.resets):
                assert vm.run(*argv).exit.exit_code == 0
                times.append(reset_ms())
            print(f"reset after {name}: median {statistics.median(times):.1f} ms "
                  f"(min {min(times):.1f}, max {max(times):.1f}, n={len(times)})", flush=True)
    finally:
        vm.destroy()
        hypervisor.close()


if __name__ == "__main__":
    main()
