"""corral's tests, in three folders:

tests/unit/   no VM, no libvirtd, no gold image: actors with probes, real
              sockets, the codecs, the client, config. `scripts/test tests/unit`
              runs them alone, in about a minute.
tests/load/   no VM either: connection floods of thousands of sockets that run
              for seconds by design (~35 s together). Marked `load`, so
              `-m 'not vm'` runs unit and load, `-m 'not vm and not load'` unit alone.
tests/vm/     real guest VMs under libvirtd, real corrald trees and processes
              (scripts/setup-host prepares what they need; a missing piece
              fails them). Every test there is marked `vm`, by the hook below.
tests/support/  what more than one test module uses (no test module imports another).
tests/tools/    measurements run by hand, not collected.
"""

from pathlib import Path

import pytest

MARKED_FOLDERS = {Path(__file__).parent / "vm": pytest.mark.vm,
                  Path(__file__).parent / "load": pytest.mark.load}


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items):
    for item in items:
        for folder, mark in MARKED_FOLDERS.items():
            if folder in item.path.parents:
                item.add_marker(mark)
