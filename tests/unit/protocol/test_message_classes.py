"""What ``@message`` makes of a class (protocol.channel.codec): construction,
equality, hashing, repr, copies, ``replace``, the declaration checks, and that
the guest agent starts without the slow modules the classes used to need."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import pytest

from protocol.channel import codec, messages as m
from protocol.channel.codec import BOOL, U32, Message, field, message, replace

REPO_ROOT = Path(__file__).resolve().parents[3]
UNUSED_TYPE_ID = 200  # no message has it; every declaration below fails before registering


def exit_message(**changes):
    values = dict(exec_id=7, exit_code=0, signal=0, timed_out=False, stdout_truncated=False,
                  stderr_truncated=False, wall_ms=1, user_cpu_ms=2, sys_cpu_ms=3, max_rss_kib=4)
    values.update(changes)
    return m.Exit(**values)


def test_positional_and_keyword_construction_agree_and_defaults_fill_in():
    positional = m.Exit(7, 0, 0, False, False, False, 1, 2, 3, 4)
    assert positional == exit_message()
    assert positional.oom_killed is False
    assert exit_message(oom_killed=True).oom_killed is True
    assert m.Output(1, stream=2, offset=0, data=b"x") == m.Output(exec_id=1, stream=2, offset=0, data=b"x")


@pytest.mark.parametrize(("args", "kwargs", "complaint"), [
    ((1, 2, 0), {}, "missing required argument 'data'"),
    ((1, 2, 0, b"", 4), {}, "takes 4 positional arguments but 5 were given"),
    ((1,), {"exec_id": 1, "stream": 2, "data": b""}, "multiple values for argument 'exec_id'"),
    ((1, 2, 0, b""), {"colour": "red"}, "unexpected keyword argument 'colour'"),
])
def test_construction_refuses_what_a_function_call_would(args, kwargs, complaint):
    with pytest.raises(TypeError, match=complaint):
        m.Output(*args, **kwargs)


def test_equality_and_hash_follow_the_field_values_and_the_class():
    assert m.Heartbeat(5) == m.Heartbeat(5) and hash(m.Heartbeat(5)) == hash(m.Heartbeat(5))
    assert m.Heartbeat(5) != m.Heartbeat(6)
    assert m.Heartbeat(5) != m.HeartbeatAck(5)  # same fields, another message
    assert len({m.Heartbeat(5), m.Heartbeat(5), m.HeartbeatAck(5)}) == 2


def test_repr_names_every_field():
    assert repr(m.Error("boom", "it broke")) == "Error(code='boom', message='it broke', exec_id=0)"


def test_fields_can_be_neither_set_nor_deleted_nor_added():
    msg = m.Reset(3)
    for attempt in (lambda: setattr(msg, "reset_id", 4), lambda: delattr(msg, "reset_id"),
                    lambda: setattr(msg, "other", 1)):
        with pytest.raises(AttributeError):
            attempt()
    assert msg.reset_id == 3


def test_replace_makes_a_changed_copy_and_refuses_unknown_fields():
    original = exit_message()
    changed = replace(original, stdout_truncated=True)
    assert changed.stdout_truncated is True and original.stdout_truncated is False
    assert replace(changed, stdout_truncated=False) == original
    with pytest.raises(TypeError, match="no field 'stdout'"):
        replace(original, stdout=b"")


def test_copies_and_pickles_are_equal_messages():
    msg = m.Exec(1, (b"ls",), ((b"K", b"V"),), b"/", b"", 0, 0, False, 0)
    assert copy.copy(msg) == msg
    assert copy.deepcopy(msg) == msg
    assert pickle.loads(pickle.dumps(msg)) == msg


def test_schema_lists_the_declared_fields_in_order():
    assert [name for name, _ in m.Output.SCHEMA] == ["exec_id", "stream", "offset", "data"]
    assert m.Output.__slots__ == ("exec_id", "stream", "offset", "data")
    assert not hasattr(m.Output(1, 1, 0, b""), "__dict__")


def test_a_field_declared_the_old_way_is_refused_with_the_new_way_named():
    with pytest.raises(TypeError, match=r"name: type = field\(wire type\)"):
        @message(UNUSED_TYPE_ID)
        class Old(Message):
            """A field with its wire type in the annotation only."""

            count: Annotated[int, U32]


def test_a_field_without_a_default_after_one_with_a_default_is_refused():
    with pytest.raises(TypeError, match="without a default after one with a default"):
        @message(UNUSED_TYPE_ID)
        class Backwards(Message):
            """Defaults out of order."""

            flag: bool = field(BOOL, default=False)
            count: int = field(U32)


def test_field_needs_a_wire_type():
    with pytest.raises(TypeError, match="wire type"):
        field(int)


def test_nothing_above_was_registered():
    with pytest.raises(codec.UnknownMessageType):
        codec.decode(bytes([UNUSED_TYPE_ID]))


# Each of these took the guest agent's start-up tens to hundreds of
# milliseconds under TCG (dataclasses and typing pull in inspect, re, enum...).
SLOW_MODULES = {"dataclasses", "typing", "inspect", "re", "enum", "ast", "dis", "contextlib", "functools",
                "collections", "ctypes", "subprocess", "signal"}


def test_the_guest_agent_starts_without_the_slow_modules():
    script = "import sys; sys.path.insert(0, sys.argv[1]); import guest.agent; print(*sys.modules)"
    result = subprocess.run([sys.executable, "-I", "-S", "-c", script, str(REPO_ROOT)],
                            capture_output=True, text=True, check=True)
    loaded = set(result.stdout.split())
    assert "guest.agent" in loaded
    assert loaded & SLOW_MODULES == set()
