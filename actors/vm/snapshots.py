"""Snapshot templates on disk: one VM's memory saved once per TemplateKey and
restored as many clones, so a refill costs a restore (~0.5 s under TCG), not a
cold boot (~3.5 s). The Hypervisor (host.py) boots, saves and restores through
libvirt; this module holds what it needs of the files:

    <state_dir>/snapshots/<instance>-<key digest>/      (root's, 0700)
        memory.save   libvirt's save image (0600): a header holding the domain
                      XML, then QEMU's migration stream (the guest's RAM, devices)
        domain.xml    the template's own domain XML, as libvirt saved it
        meta.json     the key's parts, the image's size and stream digest, the
                      channel's sequence numbers after Hello, build timings

A template is written into a hidden build directory and renamed into place
whole, so a crash mid-build never leaves one that validates. One that no
longer validates (truncated, corrupt, unreadable) is removed with a warning and
reads as absent: the caller builds a new one, no task fails for it.

Clones. libvirt restores a save image only under the name and uuid it was saved
with (restoreFlags' own XML may change paths, never those), so each clone
rewrites the XML inside the image's header in place (SaveHeader, clone_xml):
its name, uuid, generation id, overlay, channel, QMP socket and console log,
and on the net:egress tier its egress port's socket (the EgressProxy connects
to each VM's own). No corral VM has a NIC (a template with one is refused), so
there is no MAC to give each clone.
The image's flock is held from that rewrite until restoreFlags returns, so no
two restores see each other's header; QEMU's stream after it is never touched.

Session snapshots (SessionSnapshots) are Templates too: a session's VM saved
between its execs into a directory of its own under <state_dir>/sessions/,
restored as a template's clones are (a resume, a fork), and removed by
Sessions once nothing restores from it (discard_snapshot).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import threading
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from actors.vm.domain import AGENT_PORT_NAME, EGRESS_PORT_NAME, QEMU_NS
from actors.vm.errors import TemplateGone

log = logging.getLogger("corral.snapshots")

IMAGE_FILE = "memory.save"
XML_FILE = "domain.xml"
META_FILE = "meta.json"
BUILD_PREFIX = ".build-"
META_VERSION = 1

# libvirt's save image header (src/qemu/qemu_saveimage.h), native byte order:
# magic[16], version, data_len, was_running, format (0: raw), cookieOffset,
# unused[14]: 92 bytes. data_len bytes follow: the domain XML and a NUL, the
# cookie (an XML of libvirt's own) and a NUL at cookieOffset, zeros (libvirt
# pads so the XML can grow). QEMU's migration stream starts right after.
HEADER = struct.Struct("=16sIIIII56s")
SAVE_MAGIC = b"LibvirtQemudSave"
PARTIAL_MAGIC = b"LibvirtQemudPart"  # what libvirt writes until a save completes
SAVE_VERSION = 2
RAW_FORMAT = 0
MAX_DATA_LEN = 16 << 20  # libvirt's own pad is 64 KiB; more is no header of ours
# A 128 MiB guest's idle RAM saves to ~80 MiB; a stream smaller than this is broken.
MIN_STREAM_BYTES = 1 << 20
DIGEST_CHUNK = 1 << 20


class TemplateInvalid(ValueError):
    """A template's files do not hold what they must: it is removed and rebuilt.
    Never reaches a caller of the Hypervisor (restore raises RestoreFailed)."""


# --- the key ------------------------------------------------------------------------

@dataclass(frozen=True)
class TemplateKey:
    """Everything a saved VM depends on: a change to any part is another template.
    gold, agent and host name files by identity (device, inode, size, mtime), so
    an image rebuilt in place is a change too: the saved guest's page cache holds
    the old image's blocks."""

    gold: str        # kernel, initrd and gold disk: "<image dir>/<fingerprint>"
    agent: str       # the agent ISO: "<image dir>/<fingerprint>"
    host: str        # QEMU's binary and libvirt's version (a save may not restore elsewhere)
    domain: str      # digest of the default tier's domain XML (CPU, cmdline, console, QMP...)
    network: bool    # the net:egress tier
    memory_mib: int  # the res:large_mem tier, or the default size

    @property
    def digest(self) -> str:
        parts = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(parts).hexdigest()[:16]

    def same_build(self, other: TemplateKey) -> bool:
        """Same images, host and domain: a template of another tier of this build."""
        return (self.gold, self.agent, self.host, self.domain) == \
            (other.gold, other.agent, other.host, other.domain)


def fingerprint(*paths: Path) -> str:
    """"<directory of the first>/<digest of each file's identity>": cheap (stat only)."""
    digest = hashlib.sha256()
    for path in paths:
        st = os.stat(path)
        digest.update(f"{path}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}\0".encode())
    return f"{Path(paths[0]).parent.name}/{digest.hexdigest()[:16]}"


def xml_digest(xml: str) -> str:
    return hashlib.sha256(xml.encode()).hexdigest()[:16]


# --- libvirt's save image header ----------------------------------------------------

@dataclass(frozen=True)
class SaveHeader:
    """The header of a libvirt save image: fixed fields, the domain XML and the
    cookie. to_bytes() is exactly stream_offset long, so rewriting it in place
    leaves QEMU's stream where it was."""

    version: int
    data_len: int
    was_running: int
    format: int
    xml: str
    cookie: bytes  # libvirt's cookie XML without its NUL; b"" where there is none
    unused: bytes

    @property
    def stream_offset(self) -> int:
        return HEADER.size + self.data_len

    @classmethod
    def read(cls, f) -> SaveHeader:
        """Parse the header at the start of the open binary file f."""
        f.seek(0)
        fixed = f.read(HEADER.size)
        if len(fixed) < HEADER.size:
            raise TemplateInvalid(f"save image header truncated ({len(fixed)} of {HEADER.size} bytes)")
        magic, version, data_len, was_running, fmt, cookie_offset, unused = HEADER.unpack(fixed)
        if magic == PARTIAL_MAGIC:
            raise TemplateInvalid("save image is partial (libvirt never finished writing it)")
        if magic != SAVE_MAGIC:
            raise TemplateInvalid(f"not a libvirt save image (magic {magic!r})")
        if version != SAVE_VERSION:
            raise TemplateInvalid(f"save image version {version}, not {SAVE_VERSION}")
        if fmt != RAW_FORMAT:
            raise TemplateInvalid(f"save image format {fmt}, not raw")
        if not 0 < data_len <= MAX_DATA_LEN or cookie_offset >= data_len:
            raise TemplateInvalid(f"save image header lengths are broken "
                                  f"(data_len {data_len}, cookie at {cookie_offset})")
        data = f.read(data_len)
        if len(data) < data_len:
            raise TemplateInvalid(f"save image header truncated ({len(data)} of {data_len} XML bytes)")
        xml_end = cookie_offset or data_len
        xml_bytes, nul, _ = data[:xml_end].partition(b"\0")
        if not nul:
            raise TemplateInvalid("save image XML has no terminating NUL")
        cookie = data[cookie_offset:].partition(b"\0")[0] if cookie_offset else b""
        try:
            xml = xml_bytes.decode()
            ET.fromstring(xml)
        except (UnicodeDecodeError, ET.ParseError) as e:
            raise TemplateInvalid(f"save image XML does not parse: {e}") from None
        return cls(version=version, data_len=data_len, was_running=was_running, format=fmt,
                   xml=xml, cookie=cookie, unused=unused)

    def with_xml(self, xml: str) -> SaveHeader:
        header = dataclasses.replace(self, xml=xml)
        header.to_bytes()  # raises if it does not fit
        return header

    def to_bytes(self) -> bytes:
        xml = self.xml.encode() + b"\0"
        body = xml + (self.cookie + b"\0" if self.cookie else b"")
        if len(body) > self.data_len:
            raise TemplateInvalid(f"domain XML of {len(xml)} bytes does not fit the header's {self.data_len}")
        cookie_offset = len(xml) if self.cookie else 0
        return (HEADER.pack(SAVE_MAGIC, self.version, self.data_len, self.was_running, self.format,
                            cookie_offset, self.unused)
                + body + bytes(self.data_len - len(body)))


# --- a clone's domain XML ----------------------------------------------------------

def clone_xml(template_xml: str, *, name: str, uuid: str, overlay: Path, socket: Path,
              monitor: Path | None, console: Path | None, egress: Path | None = None) -> str:
    """The template's saved domain XML as one clone's: its own name, uuid and
    generation id (the guest reseeds its random pool on a new one), its own
    root overlay, channel socket, egress port socket (net:egress, given exactly
    where the template has that port), QMP socket and console log. Raises
    TemplateInvalid if the template's name is still anywhere in the result: a
    per-VM path this function does not know of would be shared by every clone."""
    root = ET.fromstring(template_xml)
    old_name = root.findtext("name")
    if not old_name:
        raise TemplateInvalid("template XML has no name")
    root.find("name").text = name
    root.find("uuid").text = uuid
    genid = root.find("genid")
    if genid is not None:
        genid.text = str(uuidlib.uuid4())
    roots = [disk for disk in root.iterfind("devices/disk")
             if disk.find("target") is not None and disk.find("target").get("dev") == "vda"]
    if len(roots) != 1 or roots[0].find("source") is None:
        raise TemplateInvalid("template XML has no single root disk (vda)")
    roots[0].find("source").set("file", str(overlay))
    for port_name, path in ((AGENT_PORT_NAME, socket), (EGRESS_PORT_NAME, egress)):
        sources = [channel.find("source") for channel in root.iterfind("devices/channel[@type='unix']")
                   if channel.find("target") is not None and channel.find("target").get("name") == port_name]
        if len(sources) > 1 or bool(sources) != (path is not None) or (sources and sources[0] is None):
            raise TemplateInvalid(f"template and clone differ on the unix channel {port_name}")
        if path is not None:
            sources[0].set("path", str(path))
    args = root.findall(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg")
    qmp = [i + 1 for i, arg in enumerate(args[:-1]) if arg.get("value") == "-qmp"]
    if bool(qmp) != (monitor is not None):
        raise TemplateInvalid("template and clone differ on a QMP socket of corral's own")
    if monitor is not None:
        # QEMU option syntax: a comma inside a value is written twice (as DomainSpec does).
        args[qmp[0]].set("value", f"unix:{str(monitor).replace(',', ',,')},server=on,wait=off")
    # libvirt shows a serial port on a file twice: as <serial> and as its <console>.
    logs = root.findall("devices/serial[@type='file']/source") + \
        root.findall("devices/console[@type='file']/source")
    if bool(logs) != (console is not None):
        raise TemplateInvalid("template and clone differ on a console log")
    for source in logs:
        source.set("path", str(console))
    if root.find("devices/interface") is not None:
        raise TemplateInvalid("template XML has a NIC, which no corral VM has")
    xml = ET.tostring(root, encoding="unicode")
    if old_name in xml:
        raise TemplateInvalid(f"template XML names {old_name} where clone_xml does not rewrite it")
    return xml


# --- templates on disk ------------------------------------------------------------

@dataclass(frozen=True)
class Template:
    """A validated template on disk: what Hypervisor.restore needs of it."""

    key: TemplateKey
    directory: Path
    xml: str             # the template's pristine domain XML (domain.xml)
    name: str            # the template VM's name in it
    inode: int           # memory.save's: a template rebuilt since is another file
    data_len: int        # its header's XML area; a rewrite keeps it
    guest_next_seq: int  # the sequence the guest's next frame carries (Hello was 0)
    host_next_seq: int   # the sequence the host's first frame must carry

    @property
    def image(self) -> Path:
        return self.directory / IMAGE_FILE


def stream_digest(f, offset: int) -> str:
    f.seek(offset)
    digest = hashlib.sha256()
    while chunk := f.read(DIGEST_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SnapshotStore:
    """This instance's templates under <state_dir>/snapshots: load and validate,
    publish a build, lock an image for a restore, remove stale or broken ones.
    Each instance keeps its own (as with its VMs), so services sharing a state
    directory never remove each other's templates. Thread-safe.

    Directories are flocked against other processes (a build's while it runs,
    an image while a clone restores from it). Within this process, one lock
    makes each look-then-act on a directory whole: a build's mkdir and its
    flock, which a sweep would otherwise see unlocked between the two; a
    publish's rename into place; and each removal's check that what is at the
    path is still what it found stale or broken (a template may be rebuilt
    there meanwhile). Removed directories are renamed away under the lock and
    deleted after it."""

    def __init__(self, root: Path, instance: str):
        self.root = Path(root)
        self.instance = instance
        self._lock = threading.Lock()
        # memory.save files whose stream digest matched in this process, by (inode, size):
        # the full read happens once per template per process, the cheap checks on every load.
        self._streams_checked: set[tuple[int, int]] = set()

    def directory(self, key: TemplateKey) -> Path:
        return self.root / f"{self.instance}-{key.digest}"

    # --- reading ---------------------------------------------------------------

    def load(self, key: TemplateKey) -> Template | None:
        """The template of `key` if one is on disk and valid; one that is not is
        removed with a warning naming why, and None returned."""
        directory = self.directory(key)
        try:
            # Every file is read through this one directory: one replaced meanwhile is not mixed in.
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            return self._validate(key, directory, dir_fd)
        except TemplateInvalid as e:
            self._remove_if_same(directory, dir_fd, str(e))
        except (OSError, ValueError, KeyError, TypeError) as e:  # unreadable, or meta.json is not ours
            self._remove_if_same(directory, dir_fd, f"{type(e).__name__}: {e}")
        finally:
            os.close(dir_fd)
        return None

    def _validate(self, key: TemplateKey, directory: Path, dir_fd: int) -> Template:
        def opener(name, flags):
            return os.open(name, flags, dir_fd=dir_fd)

        with open(META_FILE, opener=opener) as f:
            meta = json.load(f)
        if meta.get("version") != META_VERSION or meta.get("key") != dataclasses.asdict(key):
            raise TemplateInvalid("meta.json is of another key or format")
        with open(XML_FILE, opener=opener) as f:
            xml = f.read()
        try:
            name = ET.fromstring(xml).findtext("name")
        except ET.ParseError as e:
            raise TemplateInvalid(f"domain.xml does not parse: {e}") from None
        if name != meta["template_name"]:
            raise TemplateInvalid("domain.xml names another VM than meta.json")
        with open(IMAGE_FILE, "rb", opener=opener) as f:
            st = os.fstat(f.fileno())
            if st.st_size != meta["image_bytes"]:
                raise TemplateInvalid(f"memory.save is {st.st_size} bytes, not the {meta['image_bytes']} saved")
            if st.st_mode & 0o077 or st.st_uid != os.geteuid():
                os.fchmod(f.fileno(), 0o600)  # someone loosened it: the guest's memory is no one else's
                os.fchown(f.fileno(), os.geteuid(), os.getegid())
            fcntl.flock(f, fcntl.LOCK_SH)  # a restore rewrites the header under LOCK_EX
            header = SaveHeader.read(f)
            if header.data_len != meta["data_len"] or not header.was_running:
                raise TemplateInvalid("memory.save's header differs from the one saved")
            if st.st_size - header.stream_offset < MIN_STREAM_BYTES:
                raise TemplateInvalid(f"memory.save holds only {st.st_size - header.stream_offset} "
                                      "bytes of QEMU's stream")
            if (st.st_ino, st.st_size) not in self._streams_checked:
                if stream_digest(f, header.stream_offset) != meta["stream_sha256"]:
                    raise TemplateInvalid("memory.save's stream does not match its digest (corrupt)")
                self._streams_checked.add((st.st_ino, st.st_size))
        return Template(key=key, directory=directory, xml=xml, name=name, inode=st.st_ino,
                        data_len=header.data_len, guest_next_seq=meta["guest_next_seq"],
                        host_next_seq=meta["host_next_seq"])

    @contextmanager
    def locked_image(self, template: Template, shared: bool = False):
        """memory.save opened for a header rewrite, flocked until the block ends
        (held through restoreFlags); `shared`: opened to be read (copied) whole,
        with no rewrite under way. TemplateGone if the file is not the one
        `template` was loaded from: removed or rebuilt since, maybe while this
        waited for the lock. That says nothing against the template on disk now."""
        try:
            f = open(template.image, "rb" if shared else "r+b")
        except FileNotFoundError:
            raise TemplateGone(f"template {template.directory.name} was removed meanwhile") from None
        with f:
            fcntl.flock(f, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            if not self.is_current(template) or os.fstat(f.fileno()).st_ino != template.inode:
                raise TemplateGone(f"template {template.directory.name} was removed or rebuilt meanwhile")
            yield f

    @staticmethod
    def is_current(template: Template) -> bool:
        """True while `template`'s image is the one on disk (not removed or rebuilt)."""
        try:
            return os.stat(template.image).st_ino == template.inode
        except FileNotFoundError:
            return False

    # --- writing ---------------------------------------------------------------

    @contextmanager
    def building(self):
        """A fresh hidden build directory, flocked (remove_stale leaves it alone)
        while the block runs; removed at the end unless publish() moved it."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        build = self.root / f"{BUILD_PREFIX}{self.instance}-{uuidlib.uuid4().hex[:12]}"
        fd = None
        try:
            with self._lock:  # a sweep (under the same lock) sees it locked, or not at all
                build.mkdir(mode=0o700)
                fd = os.open(build, os.O_RDONLY | os.O_DIRECTORY)
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield build
        finally:
            if fd is not None:
                os.close(fd)
            shutil.rmtree(build, ignore_errors=True)

    def publish(self, build: Path, key: TemplateKey, meta: dict) -> Template:
        """Write meta.json last, then rename the build into place whole. If a
        valid template of the key is already there (built meanwhile), it wins."""
        meta = {"version": META_VERSION, "key": dataclasses.asdict(key), **meta}
        with open(build / META_FILE, "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        for name in (IMAGE_FILE, XML_FILE):
            with open(build / name, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(build)
        st = os.stat(build / IMAGE_FILE)
        self._streams_checked.add((st.st_ino, st.st_size))  # meta's digest was just read from it
        target = self.directory(key)
        with self._lock:
            try:
                os.rename(build, target)
                placed = True
            except OSError:  # ENOTEMPTY/EEXIST: one is there already
                placed = False
        if not placed:
            existing = self.load(key)
            if existing is not None:
                return existing
            with self._lock:
                os.rename(build, target)  # the one there was broken and is removed now
        _fsync_dir(self.root)
        template = self.load(key)
        if template is None:
            raise TemplateInvalid("the template just published does not validate")
        return template

    def remove_template(self, template: Template, why: str) -> bool:
        """Remove `template`, found broken, with a warning naming why, if it is
        still the one on disk (not removed or rebuilt since); True if it was."""
        with self._lock:
            doomed = self._take_away(template.directory) if self.is_current(template) else None
        return self._removed(doomed, template.directory, why)

    def _remove_if_same(self, directory: Path, dir_fd: int, why: str) -> None:
        """Remove the template directory open at dir_fd, found broken, if it is
        still the one at `directory` (not rebuilt while it was validated)."""
        with self._lock:
            try:
                same = os.path.samestat(os.stat(directory), os.fstat(dir_fd))
            except FileNotFoundError:
                same = False
            doomed = self._take_away(directory) if same else None
        self._removed(doomed, directory, why)

    def _take_away(self, directory: Path) -> Path | None:
        """Under self._lock: rename `directory` out of the way (a reader never sees a
        half-removed template; a build may take its name at once); its new path,
        to delete after the lock; None if it was gone already."""
        doomed = directory.with_name(f"{BUILD_PREFIX}{self.instance}-rm-{uuidlib.uuid4().hex[:12]}")
        try:
            os.rename(directory, doomed)
        except FileNotFoundError:
            return None
        return doomed

    @staticmethod
    def _removed(doomed: Path | None, directory: Path, why: str) -> bool:
        if doomed is None:
            return False
        shutil.rmtree(doomed, ignore_errors=True)
        log.warning("snapshot template %s is unusable (%s); removed, a new one will be built",
                    directory.name, why)
        return True

    def remove_stale(self, current: TemplateKey) -> list[str]:
        """Remove this instance's templates of another build than `current` (other
        images, QEMU or domain: they would never be restored again) and what a
        crashed build left. Templates of other tiers of the same build stay."""
        removed, doomed = [], []
        if not self.root.is_dir():
            return removed
        with self._lock:  # no build of this process is between its mkdir and its flock
            for path in self.root.iterdir():
                if path.name.startswith(f"{BUILD_PREFIX}{self.instance}-"):
                    stale = self._unlocked(path)
                elif path.name.startswith(f"{self.instance}-"):
                    stale = not self._same_build(path, current)
                else:
                    continue
                if stale and (away := self._take_away(path)) is not None:
                    doomed.append(away)
                    removed.append(path.name)
        for path in doomed:
            shutil.rmtree(path, ignore_errors=True)
        if removed:
            log.info("removed stale snapshot templates: %s", ", ".join(removed))
        return removed

    @staticmethod
    def _unlocked(path: Path) -> bool:
        """True if no build holds this directory (a build in progress flocks it)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)

    @staticmethod
    def _same_build(directory: Path, current: TemplateKey) -> bool:
        try:
            key = TemplateKey(**json.loads((directory / META_FILE).read_text())["key"])
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return key.same_build(current)


class SessionSnapshots:
    """Sessions' VMs saved whole (Hypervisor.save_session), each in a directory
    of its own, root's and 0700, never in the template store:

        <state_dir>/sessions/snapshots/<instance>-<session id>-<12 hex>/memory.save

    A snapshot is a Template (its domain XML is the header's, read back after
    the save), restored as refill clones are. Sessions owns each one once it is
    told of it and removes it (discard_snapshot); a restart ends every session,
    so the Hypervisor removes this instance's at its start (remove_all)."""

    def __init__(self, root: Path, instance: str):
        self.root = Path(root)
        self.instance = instance

    def new_directory(self, session_id: str) -> Path:
        """A fresh, empty directory for one save of `session_id`."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        directory = self.root / f"{self.instance}-{session_id}-{uuidlib.uuid4().hex[:12]}"
        directory.mkdir(mode=0o700)
        return directory

    def remove_all(self) -> list[str]:
        """Remove this instance's session snapshots (and what a restore that
        found one broken renamed away): names of those removed."""
        if not self.root.is_dir():
            return []
        # Exactly a session id between the instance and the hex: another instance
        # whose name starts with this one's never matches.
        instance, removing = re.escape(self.instance), re.escape(BUILD_PREFIX)
        mine = re.compile(rf"{instance}-s-[0-9a-f]{{16}}-[0-9a-f]{{12}}|{removing}{instance}-rm-[0-9a-f]{{12}}")
        removed = [path.name for path in self.root.iterdir() if mine.fullmatch(path.name)]
        for name in removed:
            shutil.rmtree(self.root / name, ignore_errors=True)
        return removed


def discard_snapshot(snapshot: Template) -> None:
    """Remove a session's snapshot (SessionSaved gave it to Sessions) once
    nothing will restore from it: its directory and the guest memory in it."""
    shutil.rmtree(snapshot.directory, ignore_errors=True)


def template_meta(*, name: str, header: SaveHeader, image_bytes: int, stream_sha256: str,
                  guest_next_seq: int, host_next_seq: int, boot_s: float, save_s: float) -> dict:
    """meta.json's fields besides the key (SnapshotStore.publish adds it)."""
    return {"template_name": name, "image_bytes": image_bytes, "data_len": header.data_len,
            "stream_sha256": stream_sha256, "guest_next_seq": guest_next_seq,
            "host_next_seq": host_next_seq, "created": time.time(),
            "boot_s": round(boot_s, 3), "save_s": round(save_s, 3)}
