"""Time-bounded fuzz runs of the frame decoder, the request path and a
Supervisor taking a command's output, a few seconds each
(CORRAL_FUZZ_SECONDS to change; scripts/fuzz for long runs). The properties
are in tests/support/fuzz.py."""

import os

import pytest

from tests.support.fuzz import TARGETS, fuzz

SECONDS = float(os.environ.get("CORRAL_FUZZ_SECONDS", "3"))


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz(target):
    tally, took = fuzz(target, SECONDS)
    print(f"FIGURE fuzz {target}: {tally.examples} examples in {took:.1f} s, {tally.errors_seen} refused")
    assert tally.examples >= 50
    assert 0 < tally.errors_seen < tally.examples  # both good and hostile inputs were exercised
