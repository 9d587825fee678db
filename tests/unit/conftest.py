"""Fixtures more than one unit test file uses: a fake corrald and a Client
connected to it (test_client.py, test_client_stream.py); the guest agent on a
socketpair with the test as its host (test_agent_streams.py, test_agent_execs.py)."""

import pytest

from protocol.client.api import Client
from tests.support.agent_pair import agent_pair
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


@pytest.fixture
def pair():
    """(agent, host, run_loop): tests/support/agent_pair.py."""
    with agent_pair() as p:
        yield p
