"""Fixtures of the client's unit tests (test_client.py, test_client_stream.py):
a fake corrald and a Client connected to it."""

import pytest

from protocol.client.api import Client
from tests.support.fake_corrald import FakeDaemon


@pytest.fixture
def daemon(tmp_path):
    """A fake corrald (tests/support/fake_corrald.py) on an ipc socket in the
    test's tmp dir; whatever the client got wrong on the wire fails the test."""
    fake = FakeDaemon(f"ipc://{tmp_path}/d.sock")
    yield fake
    fake.stop()
    assert fake.errors == []


@pytest.fixture
def client(daemon):
    with Client(daemon.endpoint) as c:
        yield c
