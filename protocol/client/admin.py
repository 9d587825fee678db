"""`corral admin`: the operators' client for corrald's control socket.

One request, one reply, synchronous: operators type commands, they do not
stream them. Before ZeroMQ is involved the socket file is probed
(protocol/client/reach.py), so "not running" and "not an operator" (permission
denied) are told apart at once instead of ZeroMQ retrying silently until a
timeout.
"""

from __future__ import annotations

import sys
import uuid

import zmq

from protocol.client import reach
from protocol.wire import envelope
from protocol.wire.control import CONTROL_TAG, DAEMON_TO_OPERATOR, AdminReply, AdminRequest
from protocol.channel.errors import ProtocolError
from protocol.channel.codec import decode, encode

DEFAULT_TIMEOUT_S = 30.0  # a SCRAM waits for every VM to pause
EXIT_OK, EXIT_USAGE, EXIT_FAILED = 0, 2, 125


class AdminError(Exception):
    """The control socket could not be reached or did not answer; `code`, when
    set, is reach's reason (not_running, permission_denied, unreachable)."""

    def __init__(self, message: str, code: str = ""):
        super().__init__(message)
        self.code = code


def probe(endpoint: str) -> None:
    """AdminError naming why an ipc endpoint cannot be used, if it cannot."""
    try:
        reach.probe(endpoint)
    except reach.Unreachable as e:
        if e.code == reach.PERMISSION_DENIED:
            raise AdminError(f"{e}: only corrald's operators (its own user) may use the control socket",
                             e.code) from None
        raise AdminError(str(e), e.code) from None


def request(endpoint: str, command: str, args: list[str], timeout_s: float = DEFAULT_TIMEOUT_S) -> AdminReply:
    probe(endpoint)
    request_id = uuid.uuid4().hex
    payload = encode(AdminRequest(request_id=request_id, command=command,
                                  args=tuple(a.encode() for a in args)))
    context = zmq.Context.instance()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
    try:
        dealer.connect(endpoint)
        dealer.send_multipart(envelope.build(CONTROL_TAG, payload))
        if not dealer.poll(int(timeout_s * 1000)):
            raise AdminError(f"no answer from {endpoint} within {timeout_s:g} s")
        frames = dealer.recv_multipart()
    finally:
        dealer.close()
    try:
        reply = decode(envelope.parse(CONTROL_TAG, frames), DAEMON_TO_OPERATOR)
    except envelope.MalformedEnvelope as e:
        raise AdminError(f"malformed reply from the control socket: {e}") from None
    except ProtocolError as e:
        raise AdminError(f"undecodable reply from the control socket: {e}") from None
    if reply.request_id not in (request_id, ""):
        raise AdminError("reply for another request")
    return reply


def admin_main(endpoint: str, command: list[str], timeout_s: float) -> int:
    """Print the reply's message and fields; 0 when the command succeeded."""
    if not command:
        print("corral: admin needs a command: status | scram [REASON] | resume | drain | "
              "pool-size N | sessions | session-close SESSION_ID | fault KIND [TARGET]", file=sys.stderr)
        return EXIT_USAGE
    try:
        reply = request(endpoint, command[0], command[1:], timeout_s)
    except (AdminError, ValueError) as e:
        code = getattr(e, "code", "")
        print(f"corral: {f'error {code}: ' if code else ''}{e}", file=sys.stderr)
        return EXIT_FAILED
    fields = [(k.decode(errors="replace"), v.decode(errors="replace")) for k, v in reply.fields]
    width = max((len(k) for k, _ in fields), default=0) + 2
    if reply.ok:
        print(reply.message)
    else:
        print(f"corral: error {reply.error_code}: {reply.message}", file=sys.stderr)
    for key, value in fields:
        print(f"  {key:<{width}}{value}")
    return EXIT_OK if reply.ok else EXIT_FAILED
