"""Where a built guest lives, and the hashes that name it: what a VM definition
needs to know of the image, without the builder (guest/image/build.py).

Standard library only. Each output is cached under the state directory by a
hash of what it is built from:

    <state>/images/gold-<recipe hash>/{vmlinux, initrd.img, gold.qcow2, manifest.json}
    <state>/images/agent-<agent hash>/agent.iso   (sources and their bytecode)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

RECIPE_DIR = Path(__file__).resolve().parent
REPO_DIR = RECIPE_DIR.parent.parent
RECIPE_FILES = ("recipe.toml", "init", "build.py")
# The capability table sets groups and file modes in the image: part of its recipe.
CAPABILITY_TABLE = "protocol/channel/capabilities.py"
# The room that ships into the guest: every module of it goes on the agent ISO,
# so nothing there may import beyond the standard library and this room
# (tests/protocol/test_imports.py checks both).
CHANNEL_DIR = "protocol/channel"
# What goes on the agent ISO: the agent and the protocol modules it speaks.
AGENT_FILES = (
    "guest/__init__.py",
    "guest/agent.py",
    "guest/egress_relay.py",
    "guest/files.py",
    "protocol/__init__.py",
    *sorted(f"{CHANNEL_DIR}/{path.name}" for path in (REPO_DIR / CHANNEL_DIR).glob("*.py")),
)
# Test-only: the same ISO layout with guest/hostile_agent.py in the agent's place,
# so the unchanged initramfs starts it as PID 1. Only tests attach it (they build a
# Hypervisor with this ISO); corrald's config has no way to name it.
HOSTILE_AGENT_SOURCE = "guest/hostile_agent.py"


@dataclass(frozen=True)
class GuestImage:
    """Paths of one built guest: what a VM definition needs."""

    kernel: Path
    initrd: Path
    disk: Path
    agent_iso: Path

    def missing(self) -> list[Path]:
        return [p for p in (self.kernel, self.initrd, self.disk, self.agent_iso) if not p.is_file()]


def _hash_files(paths: list[tuple[str, Path]]) -> str:
    digest = hashlib.sha256()
    for name, path in paths:
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def recipe_hash() -> str:
    return _hash_files([(name, RECIPE_DIR / name) for name in RECIPE_FILES]
                       + [(CAPABILITY_TABLE, REPO_DIR / CAPABILITY_TABLE)])


def agent_sources(hostile: bool = False) -> list[tuple[str, Path]]:
    """(path on the ISO, source in this checkout) of each file the agent ISO holds.
    The hostile ISO keeps the real agent as guest/honest_agent.py for its helpers."""
    if not hostile:
        return [(name, REPO_DIR / name) for name in AGENT_FILES]
    return [(name, REPO_DIR / (HOSTILE_AGENT_SOURCE if name == "guest/agent.py" else name))
            for name in AGENT_FILES] + [("guest/honest_agent.py", REPO_DIR / "guest/agent.py")]


def agent_hash(hostile: bool = False) -> str:
    # The builder too (it decides what else goes on the ISO: the bytecode, for one),
    # and this file (AGENT_FILES: what the ISO holds).
    return _hash_files([*agent_sources(hostile), ("guest/image/build.py", RECIPE_DIR / "build.py"),
                        ("guest/image/paths.py", RECIPE_DIR / "paths.py")])


def gold_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "images" / f"gold-{recipe_hash()}"


def agent_iso_path(state_dir: Path, hostile: bool = False) -> Path:
    kind = "hostile-agent" if hostile else "agent"
    return Path(state_dir) / "images" / f"{kind}-{agent_hash(hostile)}" / "agent.iso"


def guest_image(state_dir: Path) -> GuestImage:
    """Where the images for this checkout's recipe and agent live (built or not)."""
    gold = gold_dir(state_dir)
    return GuestImage(kernel=gold / "vmlinux", initrd=gold / "initrd.img",
                      disk=gold / "gold.qcow2", agent_iso=agent_iso_path(state_dir))
