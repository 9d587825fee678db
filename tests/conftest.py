"""corral's tests, in two halves:

tests/unit/   no VM, no libvirtd, no gold image: actors with probes, real
              sockets, the codecs, the client, config. `scripts/test tests/unit`
              (or `-m 'not vm'`) runs them alone (~100 s, most of it the
              timed floods and rates of test_hostile_clients and test_ioguard).
tests/vm/     real guest VMs under libvirtd, real corrald trees and processes
              (scripts/setup-host prepares what they need; a missing piece
              fails them). Every test there is marked `vm`, by the hook below.
tests/support/  what more than one test module uses (no test module imports another).
tests/tools/    measurements run by hand, not collected.
"""

from pathlib import Path

import pytest

VM_TESTS = Path(__file__).parent / "vm"


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items):
    for item in items:
        if VM_TESTS in item.path.parents:
            item.add_marker(pytest.mark.vm)
