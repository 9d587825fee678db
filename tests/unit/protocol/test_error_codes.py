"""ErrorCode (protocol/wire/tasks.py): the one list of codes a task can be
answered with, the same as README.md's, and the one way corrald names them."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from protocol.channel import codec
from protocol.wire import outcomes
from protocol.wire.tasks import DAEMON_TO_CLIENT, ErrorCode, error_reply

REPO_ROOT = Path(__file__).resolve().parents[3]
README_HEADING = "Error codes a task can be answered with"


def readme_codes() -> list[str]:
    """The codes README.md's list names: each item's backticked words before its
    first ': ' (an item may name several codes that share an explanation)."""
    text = (REPO_ROOT / "README.md").read_text()
    section = text[text.index(README_HEADING):]
    items = section.split("\n\n")[1]  # the paragraph after the heading line is the list
    codes = []
    for line in items.splitlines():
        if line.startswith("- "):
            codes += re.findall(r"`([a-z_]+)`", line[2:].split(": ")[0])
        else:
            assert line.startswith("  "), f"not a list item or its continuation: {line!r}"
    return codes


def test_the_readme_lists_exactly_the_error_codes():
    listed = readme_codes()
    assert len(listed) == len(set(listed)), "a code listed twice"
    assert sorted(listed) == sorted(code.value for code in ErrorCode)


def test_codes_are_their_names_in_lower_case():
    assert all(code.value == code.name.lower() for code in ErrorCode)
    assert ErrorCode.BUSY == "busy" and ErrorCode("vm_lost") is ErrorCode.VM_LOST


def test_an_error_code_crosses_the_wire_as_its_plain_text():
    reply = error_reply("t", ErrorCode.CANCELLED_SCRAM, "scram")
    plain = error_reply("t", "cancelled_scram", "scram")  # what a peer without the enum sends
    assert codec.encode(reply) == codec.encode(plain)
    decoded = codec.decode(codec.encode(reply), DAEMON_TO_CLIENT)
    assert type(decoded.error_code) is str and decoded.error_code == ErrorCode.CANCELLED_SCRAM


def test_outcomes_of_errors_after_the_command_started():
    assert outcomes.for_error(ErrorCode.VM_LOST, command_started=True) == outcomes.VM_CRASHED
    assert outcomes.for_error("timeout", command_started=True) == outcomes.TIMED_OUT  # as decoded: a str
    assert outcomes.for_error(ErrorCode.TIMEOUT, command_started=False) == outcomes.NOT_RUN
    assert outcomes.for_error(ErrorCode.BUSY, command_started=True) == outcomes.NOT_RUN


def literal_codes(path: Path) -> list[str]:
    """Where `path` names an error code with a string literal instead of
    ErrorCode: error_reply's code, Rejected's code, a Supervisor's
    self._fail code, TaskReply(error_code=...)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        position = {"error_reply": 1, "Rejected": 0}.get(name)
        if name == "_fail" and isinstance(func, ast.Attribute):
            position = 0
        candidates = [node.args[position]] if position is not None and len(node.args) > position else []
        candidates += [kw.value for kw in node.keywords if kw.arg == "error_code" and name == "TaskReply"]
        for value in candidates:
            for choice in (value.body, value.orelse) if isinstance(value, ast.IfExp) else (value,):
                if isinstance(choice, ast.Constant) and isinstance(choice.value, str) and choice.value:
                    found.append(f"{path}:{choice.lineno}: {choice.value!r}")
    return found


def test_corrald_and_the_client_name_error_codes_by_the_enum():
    sources = sorted((REPO_ROOT / "actors").rglob("*.py")) + sorted((REPO_ROOT / "protocol").rglob("*.py"))
    assert [hit for path in sources for hit in literal_codes(path)] == []


def test_the_literal_check_finds_a_literal(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('error_reply(t, "busy", "x")\nraise Rejected("budget_exhausted", "y")\n'
                     'TaskReply(error_code="timeout" if late else "")\nerror_reply(t, ErrorCode.BUSY, "ok")\n'
                     'self._fail("vm_lost", "z")\nself._fail(ch, e.code, "a guest channel error: not a task\'s")\n')
    found = [hit.split(": ", 1)[1] for hit in literal_codes(probe)]
    assert found == ["'busy'", "'budget_exhausted'", "'timeout'", "'vm_lost'"]

