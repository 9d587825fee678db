"""A corrald restart ends every session, and the owner of one is told so: a
session opened with the real CLI on a real corrald (pool of 1), corrald
stopped, a new one started on the same state directory: an exec on the old
id exits 125 with session_lost, not session_not_found, and nothing hangs."""

from tests.support.service import running_service, service_config
from tests.vm.test_sessions_cli import corral, open_session


def test_an_exec_on_a_session_from_before_a_restart_is_answered_session_lost(hypervisor, tmp_path):
    cfg = service_config(tmp_path, pool={"size": 1})
    with running_service(cfg, hypervisor) as first:
        session_id = open_session(cfg.daemon.endpoint)
        vm = next(s.vm_id for s in first.sessions_view.sessions if s.session_id == session_id)
    assert not hypervisor.domain_exists(vm)  # its VM went with corrald

    with running_service(cfg, hypervisor) as second:
        after = corral(cfg.daemon.endpoint, "exec", session_id, "--", "true")
        assert after.returncode == 125 and after.stdout == b"", after
        assert after.stderr.decode().startswith(
            f"corral: error session_lost: session {session_id} ended when corrald restarted"), after
        assert corral(cfg.daemon.endpoint, "session", "close", session_id).returncode == 125
        listed = corral(cfg.daemon.endpoint, "session", "ls")
        assert listed.returncode == 0 and session_id not in listed.stdout.decode(), listed
        assert second.metrics.sessions_ended.labels("restart")._value.get() == 1
