"""Test-only hostile guest agent: breaks the SecureChannel on purpose.

Shipped only on the hostile agent ISO (guest/image/build.py, hostile=True), where
it sits at guest/agent.py so the unchanged initramfs starts it as PID 1. Only
tests attach that ISO, by building a Hypervisor with it; corrald's config cannot
name it, so no client of a real corrald ever reaches this code.

Which attack, and when:
  - kernel command line ``corral.hostile=<attack>`` (set by the test through
    Hypervisor.faults.extra_cmdline): the attack replaces the Hello, at boot;
  - otherwise the agent behaves until an Exec arrives and then performs the
    attack its argv[0] names (some take numbers from argv[1:]). ``ok`` is a
    well-behaved command (prints "ok"), ``true`` one that prints nothing (a
    session's claim), ``hold`` one that never ends (a session's exec left
    running while the next attacks). Stdin from the host is taken and ignored.

It runs as root (PID 1), so it also stands for a task that got root: it can
panic the kernel, power off, reboot or simply die. Standard library only.
"""

from __future__ import annotations

import os
import time
import zlib

from guest.honest_agent import NO_HOST_RETRY_S, find_port  # the real agent, beside this one on the ISO
from protocol.channel import codec, constants, messages
from protocol.channel.frame import HEADER, MAGIC, FrameDecoder, FrameEncoder

STALLED_FRAME_LENGTH = 1 << 20  # what the stalling attacks declare: 1 MiB, under the host's cap
LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC
LINUX_REBOOT_CMD_RESTART = 0x01234567


def reboot_syscall(command: int) -> None:
    import ctypes
    os.sync()
    ctypes.CDLL(None).reboot(command)


class HostileAgent:
    def __init__(self, fd: int):
        self.fd = fd
        self.encoder = FrameEncoder(zlib.crc32)
        self.decoder = FrameDecoder(zlib.crc32)
        self.last_frame = b""
        self.answered = 0  # the exec whose Exit this agent sent last

    # --- writing, well-formed or not -----------------------------------------

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def frame(self, payload: bytes) -> bytes:
        self.last_frame = self.encoder.encode(payload)
        return self.last_frame

    def send(self, message: codec.Message) -> None:
        self.write(self.frame(codec.encode(message)))

    def hello(self) -> messages.Hello:
        return messages.Hello(agent_version="hostile", boot_id="hostile", kernel=os.uname().release)

    # --- the attacks ------------------------------------------------------------

    def attack(self, name: str, exec_id: int, args: tuple[int, ...] = ()) -> None:
        """Break the channel as `name` says, then wait for the host to end the VM."""
        seq = self.encoder.next_seq
        output = codec.encode(messages.Output(exec_id=exec_id, stream=constants.STDOUT, offset=0, data=b"x"))
        if name == "bad_magic":
            self.write(HEADER.pack(0x0BADF00D, 0, 0, seq))
        elif name == "oversize":  # a length far over any cap, then nothing
            self.write(HEADER.pack(MAGIC, 0xFFFFFFFF, 0, seq))
        elif name == "crc_mismatch":
            header = HEADER.pack(MAGIC, len(output), zlib.crc32(output) ^ 1, seq)
            self.write(header + output)
        elif name == "seq_gap":
            self.encoder.next_seq += 1
            self.write(self.frame(output))
        elif name == "replay":  # the last good frame again, byte for byte
            if not self.last_frame:  # at boot: Hello twice in one write, so both arrive before a pause
                self.write(self.frame(codec.encode(self.hello())) * 2)
            else:
                self.write(self.last_frame)
        elif name == "unknown_type":
            self.write(self.frame(bytes([200])))
        elif name == "malformed":  # stream 7: neither stdout nor stderr
            self.write(self.frame(output[:5] + b"\x07" + output[6:]))
        elif name == "field_too_long":  # Output.data (the last field, b"x") declares 2 MiB, over its 1 MiB bound
            self.write(self.frame(output[:-5] + (2 << 20).to_bytes(4, "big") + b"x"))
        elif name == "host_message":  # a message only the host may send
            self.send(messages.Reset(reset_id=1))
        elif name == "host_stdin":  # the host's stdin message, from the guest
            self.send(messages.Stdin(exec_id=exec_id, data=b"x", eof=True))
        elif name == "output_gap":  # the first chunk claims 1 byte went before it
            self.send(messages.Output(exec_id=exec_id, stream=constants.STDOUT, offset=1, data=b"x"))
        elif name == "output_overlap":  # the second chunk starts inside the first
            self.send(messages.Output(exec_id=exec_id, stream=constants.STDOUT, offset=0, data=b"ab"))
            self.send(messages.Output(exec_id=exec_id, stream=constants.STDOUT, offset=1, data=b"b"))
        elif name == "output_repeat":  # a chunk sent twice, as on a replay of the message (new frame)
            chunk = messages.Output(exec_id=exec_id, stream=constants.STDERR, offset=0, data=b"e")
            self.send(chunk)
            self.send(chunk)
        elif name == "output_other_exec":  # output for an exec the host never started
            self.send(messages.Output(exec_id=exec_id + 1, stream=constants.STDOUT, offset=0, data=b"x"))
        elif name == "exit_answered":  # the Exit of the exec answered last, again: it runs no more
            self.send(self.exit(self.answered))
        elif name == "output_answered":  # more output of the exec answered last, after its Exit
            self.send(messages.Output(exec_id=self.answered, stream=constants.STDOUT, offset=3, data=b"late\n"))
        elif name == "error_answered":  # a refusal of the exec answered last
            self.send(messages.Error(code="put_failed", message="hostile", exec_id=self.answered))
        elif name == "output_after_exit":  # the command's output, its Exit, then more of it
            self.send(messages.Output(exec_id=exec_id, stream=constants.STDOUT, offset=0, data=b"ok\n"))
            self.send(self.exit(exec_id))
            self.send(messages.Output(exec_id=exec_id, stream=constants.STDOUT, offset=3, data=b"late\n"))
        elif name == "wrong_state":  # Hello while running; HeartbeatAck instead of Hello
            self.send(self.hello() if exec_id else messages.HeartbeatAck(nonce=0))
        elif name == "stall_frame":  # declare 1 MiB, send argv[1] bytes of it (10), then nothing
            sent = args[0] if args else 10
            self.write(HEADER.pack(MAGIC, STALLED_FRAME_LENGTH, 0, seq) + b"s" * sent)
        elif name == "stall_header":  # half a header, then nothing (no EOF: the VM lives on)
            self.write(HEADER.pack(MAGIC, 1, 0, seq)[:7])
        elif name == "trickle_frame":  # declare 1 MiB, send it at argv[1] bytes/s (1024)
            per_s = args[0] if args else 1024
            self.write(HEADER.pack(MAGIC, STALLED_FRAME_LENGTH, 0, seq))
            for _ in range(0, STALLED_FRAME_LENGTH, 64):
                time.sleep(64 / per_s)
                self.write(b"t" * 64)
        elif name == "truncated_eof":  # half a header, then the VM powers off: EOF
            self.write(HEADER.pack(MAGIC, 1, 0, seq)[:7])
            time.sleep(0.2)
            reboot_syscall(LINUX_REBOOT_CMD_POWER_OFF)
        elif name == "panic":
            with open("/proc/sysrq-trigger", "w") as f:
                f.write("c")
        elif name == "poweroff":
            reboot_syscall(LINUX_REBOOT_CMD_POWER_OFF)
        elif name == "reboot":
            reboot_syscall(LINUX_REBOOT_CMD_RESTART)
        elif name == "die":  # PID 1 exits: the kernel panics
            os._exit(1)
        elif name != "silent":
            self.send(messages.Error(code="hostile", message=f"unknown attack {name!r}"))
        while True:  # the host decides what happens next
            time.sleep(3600)

    # --- behaving until told to attack ------------------------------------------

    def serve(self) -> None:
        self.send(self.hello())
        while True:
            data = os.read(self.fd, 65536)
            if not data:  # no host connected (after a restore, or not yet)
                time.sleep(NO_HOST_RETRY_S)
                continue
            for payload in self.decoder.feed(data):
                self.handle(codec.decode(payload, messages.HOST_TO_GUEST))

    def handle(self, message: codec.Message) -> None:
        if isinstance(message, messages.Heartbeat):
            self.send(messages.HeartbeatAck(nonce=message.nonce))
        elif isinstance(message, messages.Reset):
            self.send(messages.ResetDone(reset_id=message.reset_id, ok=True, detail=""))
        elif isinstance(message, messages.Exec):
            name = message.argv[0].decode(errors="replace")
            if name == "hold":
                return
            if name not in ("ok", "true"):
                args = tuple(int(arg) for arg in message.argv[1:] if arg.isdigit())
                self.attack(name, message.exec_id, args)
            if name == "ok":
                self.send(messages.Output(exec_id=message.exec_id, stream=constants.STDOUT, offset=0, data=b"ok\n"))
            self.send(self.exit(message.exec_id))
            self.answered = message.exec_id

    @staticmethod
    def exit(exec_id: int) -> messages.Exit:
        return messages.Exit(exec_id=exec_id, exit_code=0, signal=0, timed_out=False, stdout_truncated=False,
                             stderr_truncated=False, wall_ms=1, user_cpu_ms=0, sys_cpu_ms=0, max_rss_kib=0)


def boot_attack() -> str:
    with open("/proc/cmdline") as f:
        for arg in f.read().split():
            if arg.startswith("corral.hostile="):
                return arg.partition("=")[2]
    return ""


def main() -> None:
    agent = HostileAgent(os.open(find_port(), os.O_RDWR))
    name = boot_attack()
    if name:
        agent.attack(name, exec_id=0)
    agent.serve()


if __name__ == "__main__":
    main()
