"""What each room of protocol/ may import, as its package docstring says.

Above all, what ships into the guest imports only what the guest has. The
agent ISO (guest/image/paths.py AGENT_FILES) holds the guest agent, its file
helpers and every module of protocol/channel/, run by Debian's bare python3:
no site-packages, no crcmod, nothing else of this project. Each of those
modules may import the standard library and, within the project, only
protocol.channel (the guest's own files also each other); everything it
imports from the project must be on the ISO.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from guest.image.paths import AGENT_FILES

REPO_ROOT = Path(__file__).resolve().parents[3]
CHANNEL = REPO_ROOT / "protocol" / "channel"
GUEST_MODULES = ("guest/agent.py", "guest/files.py")
SHIPPED = sorted(str(path.relative_to(REPO_ROOT)) for path in CHANNEL.glob("*.py")) + list(GUEST_MODULES)


def imports_of(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every module `path` (a module of `package`)
    imports, at any depth (function-level imports too); `from P import N` gives
    P.N when N is a module of P's folder, else P."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the module's package
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            folder = REPO_ROOT.joinpath(*base.split("."))
            for alias in node.names:
                is_module = (folder / f"{alias.name}.py").is_file()
                found.append((node.lineno, f"{base}.{alias.name}" if is_module else base))
    return found


def project_file(name: str) -> str | None:
    """The file of project module `name`, relative to the repository, if it is one."""
    path = REPO_ROOT.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return str(candidate.relative_to(REPO_ROOT))
    return None


def foreign_imports(path: Path, package: str) -> list[str]:
    """What `path` imports that the guest does not have: anything outside the
    standard library and protocol.channel (and guest, for the guest's own
    files), or a project module that is not on the agent ISO."""
    rooms = ("protocol.channel",) + (("guest",) if package == "guest" else ())
    wrong = []
    for line, module in imports_of(path, package):
        top = module.split(".")[0]
        if top in sys.stdlib_module_names and project_file(top) is None:
            continue
        if not any(module == room or module.startswith(room + ".") for room in rooms):
            wrong.append(f"line {line}: {module}")
        elif project_file(module) not in AGENT_FILES:
            wrong.append(f"line {line}: {module} (not on the agent ISO)")
    return wrong


def test_the_agent_iso_ships_every_module_of_protocol_channel_and_the_guest_files():
    assert set(SHIPPED) <= set(AGENT_FILES)
    assert all((REPO_ROOT / name).is_file() for name in AGENT_FILES)


@pytest.mark.parametrize("name", SHIPPED)
def test_a_shipped_module_imports_the_standard_library_and_protocol_channel_only(name):
    package = ".".join(Path(name).parts[:-1])
    assert foreign_imports(REPO_ROOT / name, package) == []


def test_the_import_check_catches_third_party_and_host_side_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import zlib\nimport crcmod\nfrom protocol.wire import tasks\nfrom protocol import hostcrc\n"
                     "from . import codec\nfrom .frame import FrameDecoder\n\ndef late():\n    import zmq\n")
    assert foreign_imports(probe, "protocol.channel") == [
        "line 2: crcmod", "line 3: protocol.wire.tasks", "line 4: protocol.hostcrc", "line 9: zmq"]


def test_shipped_modules_import_in_a_bare_interpreter():
    # The guest has no crcmod and no site-packages: import them all in isolation
    # and see that nothing else got loaded.
    modules = [name.removesuffix(".py").replace("/", ".").removesuffix(".__init__") for name in SHIPPED]
    script = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); "
        "sys.modules['crcmod'] = None; "
        f"import {', '.join(modules)}; "
        "loaded = {name.split('.')[0] for name, mod in sys.modules.items() if mod is not None}; "
        "print(sorted(loaded - set(sys.stdlib_module_names) - {'__main__', 'protocol', 'guest'})); "
        "print(json.dumps(sorted(n for n in sys.modules if n.startswith(('protocol.', 'guest.')))))"
    )
    result = subprocess.run([sys.executable, "-I", "-S", "-c", script, str(REPO_ROOT)],
                            capture_output=True, text=True, check=True)
    foreign, project = result.stdout.splitlines()
    assert foreign == "[]"
    assert [name for name in json.loads(project) if project_file(name) not in AGENT_FILES] == []


ROOMS = {  # room -> modules it must never import (by prefix)
    "protocol": ("actors",),  # its top-level modules (hostcrc, bench)
    "protocol/wire": ("zmq", "actors", "protocol.client", "config"),
    "protocol/client": ("actors",),
}


@pytest.mark.parametrize("room", ROOMS)
def test_host_side_rooms_keep_to_their_imports(room):
    forbidden = ROOMS[room]
    package = room.replace("/", ".")
    wrong = [f"{path.name} line {line}: {module}"
             for path in sorted((REPO_ROOT / room).glob("*.py"))
             for line, module in imports_of(path, package)
             if any(module == f or module.startswith(f + ".") for f in forbidden)]
    assert wrong == []
