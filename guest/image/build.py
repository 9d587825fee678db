"""Builds the guest gold image and the agent ISO from Debian packages.

Runs on the host as root, standard library only (plus the Debian tools named in
scripts/setup-host). Each output is cached under the state directory by a hash
of what it is built from (guest/image/paths.py says where), so a rebuild
happens only when the recipe or the agent changes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import lzma
import os
import py_compile
import shutil
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from guest.image.paths import (CAPABILITY_TABLE, RECIPE_DIR, REPO_DIR, agent_iso_path, agent_sources,
                               gold_dir, guest_image, recipe_hash)

DEFAULT_STATE_DIR = Path("/var/lib/corral")
# Where the initramfs mounts the agent ISO in the guest (see init).
AGENT_MOUNT = "/opt/corral"
XZ_MAGIC = b"\xfd7zXZ\x00"
MODULE_SIG_MAGIC = b"~Module signature appended~\n"
# The busybox applets init runs, as symlinks: cheaper than `busybox --install` at boot.
INIT_APPLETS = ("sh", "mount", "insmod", "mkdir", "usleep", "poweroff", "switch_root", "linux64")


class BuildError(Exception):
    """A build step failed; the message names the step and the fix."""


def load_recipe() -> dict:
    with open(RECIPE_DIR / "recipe.toml", "rb") as f:
        return tomllib.load(f)


class Progress:
    """Numbered step lines with elapsed time, for a build that takes minutes."""

    def __init__(self, total: int):
        self.total = total
        self.step = 0
        self.started = time.monotonic()

    def __call__(self, what: str) -> None:
        self.step += 1
        elapsed = time.monotonic() - self.started
        print(f"[guest-image {self.step}/{self.total} +{elapsed:5.1f}s] {what}", flush=True)


def run(cmd: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, check=True, **kwargs)
    except FileNotFoundError:
        raise BuildError(f"{what}: {cmd[0]} is not installed (run scripts/setup-host)") from None
    except subprocess.CalledProcessError as e:
        detail = (e.stderr or b"").decode(errors="replace").strip()[-2000:] if isinstance(e.stderr, bytes) else ""
        raise BuildError(f"{what}: `{' '.join(cmd[:3])} ...` exited {e.returncode}. {detail}") from None


# --- kernel -----------------------------------------------------------------------

def fetch_kernel(recipe: dict, work: Path) -> tuple[Path, str]:
    """Download the Debian kernel package and unpack it; return (tree, version)."""
    meta = recipe["kernel"]["package"]
    deps = run(["apt-cache", "depends", meta], "kernel lookup", capture_output=True).stdout.decode()
    versioned = [line.split(":", 1)[1].strip() for line in deps.splitlines()
                 if line.strip().startswith("Depends:") and "linux-image-" in line]
    if not versioned:
        raise BuildError(f"kernel lookup: {meta} names no linux-image package (run apt-get update)")
    debs = work / "debs"
    debs.mkdir()
    run(["apt-get", "download", "-q", versioned[0]], "kernel download", cwd=debs, capture_output=True)
    tree = work / "kernel"
    run(["dpkg-deb", "-x", str(next(debs.glob("*.deb"))), str(tree)], "kernel unpack")
    versions = sorted(p.name for p in (tree / "lib/modules").iterdir())
    return tree, versions[-1]


def extract_vmlinux(bzimage: Path, out: Path) -> None:
    """Uncompressed ELF kernel: QEMU boots it through PVH, saving ~2 s of
    in-guest decompression under TCG (GUEST-NOTES.md)."""
    data = bzimage.read_bytes()
    start = data.find(XZ_MAGIC)
    if start < 0:
        raise BuildError(f"vmlinux: {bzimage.name} is not xz-compressed as Debian's kernels are")
    elf = lzma.LZMADecompressor().decompress(data[start:])
    if elf[:4] != b"\x7fELF":
        raise BuildError("vmlinux: decompressed kernel is not an ELF file")
    out.write_bytes(elf)


def module_load_order(tree: Path, version: str, wanted: list[str]) -> list[str]:
    """Module paths (relative to the modules dir) in an order insmod accepts:
    every module after all it depends on; built-in modules left out."""
    moddir = tree / "lib/modules" / version
    run(["depmod", "-b", str(tree), version], "depmod")

    def name_of(path: str) -> str:
        return Path(path).name.split(".ko")[0].replace("-", "_")

    deps: dict[str, tuple[str, list[str]]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[name_of(path)] = (path, [name_of(p) for p in rest.split()])
    builtin = {name_of(p) for p in (moddir / "modules.builtin").read_text().split()}

    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name in builtin:
            return
        seen.add(name)
        if name not in deps:
            raise BuildError(f"initramfs: kernel {version} has no module {name}")
        path, requires = deps[name]
        for dep in reversed(requires):
            visit(dep)
        order.append(path)

    for name in wanted:
        visit(name.replace("-", "_"))
    return order


# --- initramfs (cpio newc, written here so no cpio quirks leak in) ---------------

class Cpio:
    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.inode = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = [self.inode, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0]
        self.inode += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.parts += [header, encoded, b"\0" * (-(len(header) + len(encoded)) % 4),
                       data, b"\0" * (-len(data) % 4)]

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self.parts)


def module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return strip_signature(lzma.decompress(data))
    if path.name.endswith(".ko"):
        return strip_signature(data)
    raise BuildError(f"initramfs: unsupported module compression {path.name}")


def strip_signature(module: bytes) -> bytes:
    """The module without its appended signature: checking it (a SHA-256 over the
    whole module, then RSA) is slow under TCG, and proves nothing here, where the
    build put the module into the initramfs itself from the verified Debian
    package and the kernel does not enforce signatures. The kernel notes the
    unsigned module once in its log ("tainting kernel") and loads it."""
    if not module.endswith(MODULE_SIG_MAGIC):
        return module
    # struct module_signature (12 bytes, signature length last, big-endian) precedes the magic.
    info_end = len(module) - len(MODULE_SIG_MAGIC)
    sig_len = int.from_bytes(module[info_end - 4:info_end], "big")
    start = info_end - 12 - sig_len
    if start <= 0:
        raise BuildError("initramfs: malformed module signature")
    return module[:start]


def build_initramfs(recipe: dict, tree: Path, version: str, out: Path) -> None:
    cpio = Cpio()
    # lower, rw, newroot: the mount points init needs (see init).
    for d in ("bin", "dev", "proc", "sys", "lib", "lib/modules", "lower", "rw", "newroot"):
        cpio.directory(d)
    cpio.char_device("dev/console", 5, 1)
    busybox = Path("/bin/busybox")
    if not busybox.is_file():
        raise BuildError("initramfs: /bin/busybox missing (apt-get install busybox-static)")
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in INIT_APPLETS:
        cpio.symlink(f"bin/{applet}", "busybox")
    cpio.file("init", (RECIPE_DIR / "init").read_bytes(), 0o755)
    moddir = tree / "lib/modules" / version
    names = []
    for path in module_load_order(tree, version, recipe["initramfs"]["core_modules"]):
        flat = Path(path).name.removesuffix(".xz")
        cpio.file(f"lib/modules/{flat}", module_bytes(moddir / path))
        names.append(flat)
    cpio.file("modules.core", "".join(n + "\n" for n in names).encode())
    out.write_bytes(cpio.finish())


# --- root filesystem --------------------------------------------------------------

def host_mirror(suite: str) -> str:
    """The Debian mirror this host's apt already uses (so the guest comes from the same place)."""
    sources = Path("/etc/apt/sources.list.d")
    candidates = sorted(sources.glob("*.sources")) if sources.is_dir() else []
    for path in candidates:
        for stanza in path.read_text().split("\n\n"):
            fields = dict(line.split(":", 1) for line in stanza.splitlines()
                          if ":" in line and not line.startswith("#"))
            fields = {k.strip(): v.strip() for k, v in fields.items()}
            if suite in fields.get("Suites", "").split() and "Types" in fields:
                return fields["URIs"].split()[0]
    legacy = Path("/etc/apt/sources.list")
    if legacy.is_file():
        for line in legacy.read_text().splitlines():
            words = line.split()
            if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
                return words[1]
    raise BuildError(f"rootfs: no apt source for {suite} on this host; add one to /etc/apt/sources.list")


def build_rootfs(recipe: dict, rootdir: Path) -> None:
    rootfs = recipe["rootfs"]
    user, uid = rootfs["task_user"], int(rootfs["task_uid"])
    cmd = ["mmdebstrap", f"--variant={rootfs['variant']}", "--include=" + ",".join(rootfs["packages"])]
    cmd += [f"--dpkgopt=path-exclude={p}" for p in rootfs["exclude_paths"]]
    cmd += [
        f'--customize-hook=chroot "$1" useradd --create-home --uid {uid} --user-group --shell /bin/sh {user}',
        f'--customize-hook=mkdir -p "$1{AGENT_MOUNT}"',  # the agent ISO's mount point
        '--customize-hook=rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/*',
        rootfs["suite"], str(rootdir),
        f"deb {host_mirror(rootfs['suite'])} {rootfs['suite']} main",
    ]
    run(cmd, "rootfs (mmdebstrap)", stdin=subprocess.DEVNULL)
    restrict_to_capabilities(rootdir)
    for directory in rootfs.get("root_only_dirs", []):
        path = rootdir / directory.lstrip("/")
        os.chown(path, 0, 0, follow_symlinks=False)
        os.chmod(path, 0o755, follow_symlinks=False)
    check_task_writable(rootdir, user, uid)


def task_writable_paths(rootdir: Path, uid: int, gids: list[int]) -> list[str]:
    """Every path in the image the task user can write to, or chmod to writable
    (it owns it), holding every soft capability's group: the kernel's answer, from
    find run as that user in the tree. Symlinks are left out (their targets are
    paths of their own, or not in the image), and so are device nodes (a write
    goes to the device, and the guest mounts a devtmpfs over the image's /dev).
    Directories the task cannot search are not descended into, as the task could
    not either."""
    groups = ",".join(str(g) for g in [uid, *gids])
    result = subprocess.run(
        ["chroot", f"--userspec={uid}:{uid}", f"--groups={groups}", str(rootdir),
         "find", "/", "-xdev", "!", "-type", "l", "!", "-type", "c", "!", "-type", "b", "(", "-writable", "-o", "-user", str(uid), ")"],
        capture_output=True)
    # find exits 1 over the directories it may not read; any other failure is the build's.
    if result.returncode not in (0, 1) or not result.stdout:
        raise BuildError(f"task-writable check: find exited {result.returncode}: "
                         f"{result.stderr.decode(errors='replace')[-500:]}")
    return sorted(result.stdout.decode(errors="surrogateescape").splitlines())


def check_task_writable(rootdir: Path, user: str, uid: int) -> None:
    """Fail the build on any place the task user can write that no reset wipes:
    only the shared temporary directories (protocol/channel/capabilities.py) and the task
    user's home may be writable. The agent's reset empties those by name and also
    sweeps whatever else the overlay gained since boot (guest/agent.py); this
    check keeps the image from offering more places than the reset knows about."""
    table = _load_capability_table()
    home = next(line.split(":")[5] for line in (rootdir / "etc/passwd").read_text().splitlines()
                if line.split(":")[0] == user)
    covered = (*table.SHARED_TMP_DIRS, home)
    gids = [gid for _, _, gid, _ in table.SOFT.values() if gid is not None]
    writable = task_writable_paths(rootdir, uid, gids)
    uncovered = [p for p in writable
                 if not any(p == place or p.startswith(place + "/") for place in covered)]
    if uncovered:
        raise BuildError(f"task-writable check: the task user can write {len(uncovered)} path(s) "
                         f"that no reset wipes: {', '.join(uncovered[:20])} (make them root's in "
                         "recipe.toml root_only_dirs, or have the agent's reset cover them)")
    print(f"[guest-image] task-writable check: {len(writable)} writable path(s), all in "
          f"{', '.join(covered)}", flush=True)


def _load_capability_table():
    spec = importlib.util.spec_from_file_location("corral_capabilities", REPO_DIR / CAPABILITY_TABLE)
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    return table


def restrict_to_capabilities(rootdir: Path) -> None:
    """Soft capabilities in the image (protocol/channel/capabilities.py): a group per
    capability, every executable file of its packages root:<group> 0750 (o-rwx, so
    a task without the group can neither run nor copy it), and the shared
    temporary directories root:<fs:write_tmp group> 1775."""
    table = _load_capability_table()
    for name, (_, group, gid, packages) in table.SOFT.items():
        if group is None:
            continue
        run(["chroot", str(rootdir), "groupadd", "--system", "--gid", str(gid), group],
            f"group for {name}", capture_output=True)
        restricted = 0
        for package in packages:
            lists = list((rootdir / "var/lib/dpkg/info").glob(f"{package}.list")) + \
                list((rootdir / "var/lib/dpkg/info").glob(f"{package}:*.list"))
            if not lists:
                raise BuildError(f"capability {name}: package {package} is not in the image")
            for line in lists[0].read_text().splitlines():
                path = rootdir / line.lstrip("/")
                try:
                    st = path.lstat()
                except FileNotFoundError:  # e.g. a path excluded by exclude_paths
                    continue
                if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
                    os.chown(path, 0, gid)
                    # chown clears setuid/setgid bits; none of these packages has any.
                    os.chmod(path, (st.st_mode & 0o7770) | 0o010)
                    restricted += 1
        if packages and not restricted:
            raise BuildError(f"capability {name}: no executable found in {packages}")
        print(f"[guest-image] {name}: {restricted} executables restricted to group {group}", flush=True)
    _, _, tmp_gid, _ = table.SOFT[table.FS_WRITE_TMP]
    for directory in table.SHARED_TMP_DIRS:
        path = rootdir / directory.lstrip("/")
        if path.is_dir() and not path.is_symlink():
            os.chown(path, 0, tmp_gid)
            os.chmod(path, table.SHARED_TMP_MODE)


def build_disk(recipe: dict, rootdir: Path, raw: Path, qcow2: Path) -> None:
    used = int(run(["du", "-s", "--block-size=1M", str(rootdir)], "rootfs size",
                   capture_output=True).stdout.split()[0])
    size_mib = int(used * 1.15) + int(recipe["rootfs"]["headroom_mib"])
    # No journal: the guest mounts it read-only; writes go to a tmpfs overlay.
    run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-L", "corral-root", "-d", str(rootdir),
         str(raw), f"{size_mib}M"], "mkfs.ext4", capture_output=True)
    run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow2)], "qemu-img convert",
        capture_output=True)


def build_gold(state_dir: Path, force: bool = False) -> Path:
    target = gold_dir(state_dir)
    if not force and all((target / p).is_file() for p in ("vmlinux", "initrd.img", "gold.qcow2")):
        print(f"[guest-image] gold image {target.name} is up to date")
        return target
    if os.geteuid() != 0:
        raise BuildError("gold image: must run as root (mmdebstrap and depmod need it)")
    recipe = load_recipe()
    progress = Progress(6)
    work = target.with_name(target.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.monotonic()
    progress("fetching the Debian kernel package")
    tree, version = fetch_kernel(recipe, work)
    progress(f"extracting vmlinux from kernel {version}")
    extract_vmlinux(next((tree / "boot").glob("vmlinuz-*")), work / "vmlinux")
    progress("building the initramfs (busybox + modules)")
    build_initramfs(recipe, tree, version, work / "initrd.img")
    progress("building the root filesystem with mmdebstrap (the long step)")
    rootdir = work / "rootfs"
    build_rootfs(recipe, rootdir)
    progress("making the ext4 filesystem and the qcow2 gold image")
    build_disk(recipe, rootdir, work / "rootfs.raw", work / "gold.qcow2")
    progress("cleaning up")
    shutil.rmtree(rootdir)
    shutil.rmtree(tree)
    shutil.rmtree(work / "debs")
    (work / "rootfs.raw").unlink()
    for p in ("vmlinux", "initrd.img", "gold.qcow2"):
        (work / p).chmod(0o444)  # the gold image is never modified
    manifest = {
        "recipe_hash": recipe_hash(),
        "kernel_version": version,
        "build_seconds": round(time.monotonic() - started, 1),
        "gold_qcow2_bytes": (work / "gold.qcow2").stat().st_size,
        "initrd_bytes": (work / "initrd.img").stat().st_size,
    }
    (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    work.rename(target)
    print(f"[guest-image] built {target} in {manifest['build_seconds']} s: "
          f"gold.qcow2 {manifest['gold_qcow2_bytes'] / 2**20:.0f} MiB", flush=True)
    return target


def compile_for_guest(source: Path, guest_path: str) -> None:
    """Bytecode beside `source` in __pycache__, so the guest does not compile the
    agent and the protocol at every boot (~0.3 s under TCG). Unchecked-hash pycs:
    the ISO is read-only, so Python need not compare them with their source. The
    file name carries this interpreter's cache tag (cpython-311 here and in the
    bookworm guest, same bytecode magic); a guest with another Python ignores the
    file, and one with a different magic recompiles: either way only slower."""
    py_compile.compile(str(source), cfile=importlib.util.cache_from_source(str(source)),
                       dfile=guest_path, doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)


def build_agent_iso(state_dir: Path, force: bool = False, hostile: bool = False) -> Path:
    """The agent ISO (cached by hash); hostile=True: the test-only hostile agent's."""
    iso = agent_iso_path(state_dir, hostile)
    if iso.is_file() and not force:
        print(f"[guest-image] agent ISO {iso.parent.name} is up to date")
        return iso
    staging = iso.parent.with_name(iso.parent.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    tree = staging / "tree"
    for name, source in agent_sources(hostile):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, tree / name)
        compile_for_guest(tree / name, f"{AGENT_MOUNT}/{name}")
    run(["xorriso", "-as", "mkisofs", "-quiet", "-R", "-V", "CORRAL_AGENT", "-o",
         str(staging / "agent.iso"), str(tree)], "agent ISO (xorriso)", capture_output=True)
    shutil.rmtree(tree)
    (staging / "agent.iso").chmod(0o444)
    shutil.rmtree(iso.parent, ignore_errors=True)
    staging.rename(iso.parent)
    print(f"[guest-image] built {iso}", flush=True)
    return iso


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build corral's guest gold image and agent ISO.")
    parser.add_argument("--state-dir", type=Path,
                        default=Path(os.environ.get("CORRAL_STATE_DIR", DEFAULT_STATE_DIR)))
    parser.add_argument("--force", action="store_true", help="rebuild even when cached")
    parser.add_argument("--print-paths", action="store_true", help="print the image paths and exit")
    args = parser.parse_args(argv)
    if args.print_paths:
        image = guest_image(args.state_dir)
        for field in ("kernel", "initrd", "disk", "agent_iso"):
            print(f"{field}: {getattr(image, field)}")
        return 0
    try:
        build_gold(args.state_dir, args.force)
        build_agent_iso(args.state_dir, args.force)
    except BuildError as e:
        print(f"build-guest-image: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
