"""corrald: the host daemon.

Start-up checks every precondition and fails with one line naming the fix
(never a traceback for an operator): config values, the guest image, libvirtd,
the endpoint. Then it reaps what an earlier crash left (domains, overlays,
sockets), starts the supervision tree and serves until SIGINT/SIGTERM, when it
stops taking tasks, answers every task it holds and destroys its VMs.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

import config
from actors.edge.endpoint import check_endpoint_free
from actors.errors import CorralError
from actors.vm.host import Hypervisor

log = logging.getLogger("corral.daemon")


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, for log shippers (daemon.log_format = "json")."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
                 "level": record.levelname.lower(), "logger": record.name,
                 "message": record.getMessage(), "thread": record.threadName}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter() if log_format == "json" else logging.Formatter(
        "%(asctime)s corrald %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="corrald", description="corral host daemon")
    parser.add_argument("--config", type=Path, help="site config (TOML) over config/corral.toml")
    parser.add_argument("--check", action="store_true",
                        help="run the start-up checks (config, image, libvirtd, endpoint) and exit")
    args = parser.parse_args(argv)
    try:
        cfg = config.load(args.config)
    except config.ConfigError as e:
        print(f"corrald: {e}", file=sys.stderr)
        return 2
    configure_logging(cfg.daemon.log_level, cfg.daemon.log_format)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    hypervisor = service = None
    try:
        check_endpoint_free(cfg.daemon.endpoint)
        check_endpoint_free(cfg.control.endpoint, "control.endpoint")
        hypervisor = Hypervisor.from_config(cfg)
        if args.check:  # a check changes nothing
            print(f"corrald: checks passed (accelerator {hypervisor.accelerator}, "
                  f"image {hypervisor.image.disk.parent.name})")
            return 0
        for name in hypervisor.reap_leftovers():
            log.warning("reaped VM %s left by an earlier run", name)
        from actors.service import Corral  # pykka and zmq only when serving

        service = Corral(cfg, hypervisor, on_give_up=lambda reason: stop.set())
        service.start()
        log.info("serving on %s with a pool of %d", cfg.daemon.endpoint, cfg.pool.size)
        stop.wait()
        if service.gave_up.is_set():
            print(f"corrald: stopping: {service.give_up_reason}", file=sys.stderr)
    except CorralError as e:
        print(f"corrald: {e}", file=sys.stderr)
        return 1
    finally:
        if service is not None:
            log.info("stopping: finishing tasks for up to %g s, then answering the rest "
                     "and destroying VMs", cfg.daemon.shutdown_grace_s)
            service.stop(grace_s=0 if service.gave_up.is_set() else cfg.daemon.shutdown_grace_s)
        if hypervisor is not None:
            hypervisor.close()
    log.info("stopped")
    return 3 if service is not None and service.gave_up.is_set() else 0


if __name__ == "__main__":
    sys.exit(main())
