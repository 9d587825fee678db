"""corrald's Prometheus metrics, one registry per daemon (tests run several).

Actors update them from their own threads (prometheus-client is thread-safe);
the IntakeServer reads the gauges to answer `corral status` without asking any
actor.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from actors.messages import PoolVmState
from actors.session_table import END_REASONS as SESSION_END_REASONS
from protocol.wire.tasks import PRIORITY_NAMES

# The states a live VM can be in: the corral_pool_vms series, each kept at 0 when none is.
POOL_STATES = (PoolVmState.BOOTING, PoolVmState.READY, PoolVmState.BUSY, PoolVmState.RESETTING,
               PoolVmState.SESSION)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# A refill: ~0.5-1 s for a restored clone, ~3-5 s for a cold boot under TCG, ~8 s with a template build.
REFILL_BUCKETS = (0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 5, 7.5, 10, 15, 30, 60)
# How a VM was made (actors/refill.py): restored from its tier's snapshot template; restored
# after building that template first; cold booted.
REFILL_KINDS = ("restore", "build", "boot")
# A session's life, its VM's start until its end: minutes for an agent's tool loop, up to sessions.max_life_s.
SESSION_LIFETIME_BUCKETS = (1, 10, 30, 60, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400, 604800)
# A fork: an open session's save (~1-2 s under TCG), then its restores one after another (~0.5 s each).
FORK_BUCKETS = (0.5, 1, 2, 3, 4, 5, 7.5, 10, 15, 20, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("corral_queue_depth", "Tasks waiting, by priority", ["priority"], registry=r)
        self.pool_vms = Gauge("corral_pool_vms", "VMs in the pool, by state", ["state"], registry=r)
        self.tasks = Counter("corral_tasks_total", "Answered tasks, by outcome", ["outcome"], registry=r)
        self.outcomes = Counter("corral_task_outcomes_total",
                                "Answered tasks, by outcome class (docs/artifacts.md)", ["outcome"], registry=r)
        self.rejected = Counter("corral_requests_rejected_total", "Requests refused before acceptance, by code",
                                ["code"], registry=r)
        self.accepted = Counter("corral_tasks_accepted_total", "Tasks accepted by Intake", registry=r)
        self.egress_connections = Counter("corral_egress_connections_total",
                                          "net:egress connections the egress proxy decided, by verdict",
                                          ["verdict"], registry=r)
        self.duplicate_answers = Counter(
            "corral_duplicate_answers_total", "Answers dropped because the task was already answered",
            registry=r)
        self.violations = Counter("corral_guest_protocol_violations_total",
                                  "Guest protocol violations, by kind", ["kind"], registry=r)
        self.deadman_kills = Counter("corral_deadman_kills_total", "VMs destroyed by the dead-man's switch",
                                     registry=r)
        self.vms_destroyed = Counter("corral_vms_destroyed_total", "VMs destroyed, by reason", ["reason"],
                                     registry=r)
        self.actor_restarts = Counter("corral_actor_restarts_total", "Core actor restarts", ["actor"],
                                      registry=r)
        self.boot_seconds = Histogram("corral_vm_boot_seconds", "Cold boot until the agent's hello",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.refill_seconds = Histogram(
            "corral_vm_refill_seconds", "A new VM's Supervisor start until the VM is offered, by how it was made "
            "(restore: a snapshot clone; build: a clone after building its tier's template; boot: a cold boot)",
            ["kind"], buckets=REFILL_BUCKETS, registry=r)
        self.snapshot_builds = Counter("corral_snapshot_builds_total",
                                       "Snapshot template builds, by result (ok, failed)", ["result"], registry=r)
        self.restore_failures = Counter(
            "corral_snapshot_restore_failures_total", "Snapshot clones that failed and fell back to cold boots, "
            "by stage (restore: libvirt's restore; resuming: the Resume exchange; warming: the warm-up exec)",
            ["stage"], registry=r)
        self.acquire_seconds = Histogram("corral_vm_acquire_seconds", "Resume until the agent answers",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.handshakes_denied = Counter(
            "corral_handshakes_denied_total", "Client connections the ZAP handler refused (key not allowed)",
            registry=r)
        self.run_seconds = Histogram("corral_task_run_seconds", "Command wall time in the guest",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.connections = Gauge("corral_connections", "Connections open on a corrald socket, by endpoint "
                                 "(client, control); shed ones until libzmq has closed them", ["endpoint"],
                                 registry=r)
        self.connections_refused = Counter(
            "corral_connections_refused_total", "Connections shed on arrival because the endpoint was at "
            "its limit (daemon.max_connections, control.max_connections)", ["endpoint"], registry=r)
        self.answers_undeliverable = Counter(
            "corral_answers_undeliverable_total", "Answers not sent because the connection that asked is "
            "gone (never to whoever holds its routing id now)", ["endpoint"], registry=r)
        self.routing_id_reuse = Counter(
            "corral_routing_id_reuse_total", "Requests from a connection using the routing id of another "
            "connection's unanswered requests, by whether the caller is the same identity", ["endpoint", "identity"],
            registry=r)
        self.safe_mode = Gauge("corral_safe_mode", "1 while corrald is in safe mode after a SCRAM",
                               registry=r)
        self.scram_pause_seconds = Gauge(
            "corral_scram_pause_seconds", "Last SCRAM: time from the command until every VM was paused",
            registry=r)
        self.sessions_open = Gauge("corral_sessions_open", "Sessions holding a VM (open or closing)",
                                   registry=r)
        self.session_execs = Counter("corral_session_execs", "Execs given to sessions' VMs", registry=r)
        self.session_lifetime_seconds = Histogram(
            "corral_session_lifetime_seconds", "Ended sessions: their VM became theirs until they ended",
            buckets=SESSION_LIFETIME_BUCKETS, registry=r)
        self.sessions_ended = Counter(
            "corral_sessions_ended", "Sessions ended, by reason (closed, idle, lifetime, operator, draining, "
            "deadman, vm_lost, protocol_violation, shutdown, restart, save_failed, restore_failed, fork_failed)",
            ["reason"], registry=r)
        self.sessions_paused = Gauge("corral_sessions_paused", "Sessions paused to disk: a snapshot, no VM",
                                     registry=r)
        self.session_snapshots = Counter(
            "corral_session_snapshots", "Session pauses, resumes and forks carried out, by op (pause, resume, "
            "fork) and result (ok, failed: the save or a restore failed, or the session ended meanwhile); "
            "refusals are counted by corral_session_requests_total", ["op", "result"], registry=r)
        self.session_fork_seconds = Histogram(
            "corral_session_fork_seconds", "Forks answered with their new sessions: the fork's arrival until "
            "its answer (a save of an open session, then one restore per session)",
            buckets=FORK_BUCKETS, registry=r)
        self.session_requests = Counter(
            "corral_session_requests", "Session requests answered, by request (open, close, list, pause, "
            "resume, fork) and code (ok, or the error code)", ["request", "code"], registry=r)
        for name in PRIORITY_NAMES:
            self.queue_depth.labels(name)
        for state in POOL_STATES:
            self.pool_vms.labels(state)
        for kind in REFILL_KINDS:
            self.refill_seconds.labels(kind)
        for result in ("ok", "failed"):
            self.snapshot_builds.labels(result)
        for stage in ("restore", "resuming", "warming"):
            self.restore_failures.labels(stage)
        for reason in SESSION_END_REASONS:
            self.sessions_ended.labels(reason)
        for op in ("pause", "resume", "fork"):
            for result in ("ok", "failed"):
                self.session_snapshots.labels(op, result)

    def serve(self, address: str, port: int) -> int:
        """Serve /metrics over HTTP from a thread of its own; returns the port bound."""
        try:
            self.http_server, _ = start_http_server(port, address, registry=self.registry)
        except OSError as e:
            from actors.errors import CorralError
            raise CorralError(f"cannot serve metrics on {address}:{port} ({e.strerror}); "
                              "set metrics.port to a free port") from None
        return self.http_server.server_port

    def close(self) -> None:
        server = getattr(self, "http_server", None)
        if server is not None:
            server.shutdown()
            server.server_close()

    def watch_ioguard(self, stats) -> None:
        """IOGuard's own counters, read at scrape time (`stats` returns its totals)."""
        self.registry.register(IoGuardCollector(stats))

    def watch_pool(self, view) -> None:
        """One series per live VM, read from the PoolView at scrape time, so a
        VM's series goes when the VM does."""
        self.registry.register(PoolVmCollector(view))

    def watch_budgets(self, snapshot) -> None:
        """Budgets per identity, read at scrape time (`snapshot` is BudgetLedger.snapshot)."""
        self.registry.register(BudgetCollector(snapshot))

    def watch_streams(self, totals) -> None:
        """Streaming tasks' output and stdin, read from the IntakeServer's
        StreamTotals (actors/edge/streams.py) at scrape time."""
        self.registry.register(StreamCollector(totals))

    def gauge_values(self, gauge: Gauge) -> dict[str, int]:
        return {sample.labels[gauge._labelnames[0]]: int(sample.value)
                for metric in gauge.collect() for sample in metric.samples}

    def counter_total(self, counter: Counter) -> int:
        return int(sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total")))


class IoGuardCollector:
    """Exports IOGuard's running totals; asks it only when Prometheus scrapes."""

    def __init__(self, stats):
        self.stats = stats

    def collect(self):
        totals = self.stats() or {}
        for family_type, name, key, help_text in (
                (CounterMetricFamily, "corral_ioguard_read_bytes", "bytes_read", "Bytes read from guest channels"),
                (CounterMetricFamily, "corral_ioguard_read_frames", "frames_read", "Frames read from guest channels"),
                (CounterMetricFamily, "corral_ioguard_throttled_seconds", "throttled_s",
                 "Time guest channels were not read for want of tokens"),
                (CounterMetricFamily, "corral_ioguard_stalls", "stalls", "Times a guest channel ran out of tokens"),
                (CounterMetricFamily, "corral_ioguard_room_waits", "room_waits",
                 "Frames that waited for room under ioguard.max_partial_bytes"),
                (GaugeMetricFamily, "corral_ioguard_partial_bytes", "partial_bytes",
                 "Bytes admitted to guest frames in progress (bounded by ioguard.max_partial_bytes)"),
                (GaugeMetricFamily, "corral_ioguard_partial_held_bytes", "partial_held",
                 "Bytes held of guest frames in progress"),
                (GaugeMetricFamily, "corral_ioguard_frames_waiting_for_room", "waiting_for_room",
                 "Guest channels not read until their frame fits under ioguard.max_partial_bytes")):
            family = family_type(name, help_text)
            family.add_metric([], float(totals.get(key, 0)))
            yield family


class StreamCollector:
    """Streams (actors/edge/streams.py): what is held for callers now, what
    was sent, dropped, held and refused since start."""

    DROP_REASONS = ("absent_reader", "overflow", "lost", "late")
    STDIN_REFUSALS = ("over_cap", "held_total", "not_open", "closed", "unknown_task")
    ATTACH_RESULTS = ("resumed", "unknown_task")

    def __init__(self, totals):
        self.totals = totals

    def collect(self):
        t = self.totals
        for family_type, name, value, help_text in (
                (GaugeMetricFamily, "corral_stream_buffered_bytes", t.buffered,
                 "Output held for streaming tasks' callers, sent and not acknowledged or not sent yet"),
                (GaugeMetricFamily, "corral_stream_stdin_held_bytes", t.stdin_held,
                 "Stdin held for streaming tasks whose command has not started"),
                (CounterMetricFamily, "corral_stream_chunks_sent", t.chunks_sent,
                 "TaskOutput frames sent to callers (again after an attach included)"),
                (CounterMetricFamily, "corral_stream_sent_bytes", t.bytes_sent, "Output bytes sent in TaskOutput frames"),
                (CounterMetricFamily, "corral_stream_reader_holds", t.reader_holds,
                 "Times a caller so far behind held its task's VM channel (ReaderHold)"),
                (CounterMetricFamily, "corral_stream_stdin_forwarded_bytes", t.stdin_forwarded,
                 "TaskStdin bytes told to the task's Supervisor"),
                (CounterMetricFamily, "corral_stream_acks_ignored", t.acks_ignored,
                 "StreamAcks for no task of that connection (after its reply, or unknown)"),
                (CounterMetricFamily, "corral_stream_replies_expired", t.replies_expired,
                 "Replies of ended streaming tasks dropped after tasks.stream_linger_s without their caller")):
            family = family_type(name, help_text)
            family.add_metric([], float(value))
            yield family
        for name, counts, label, values, help_text in (
                ("corral_stream_dropped_bytes", t.dropped, "reason", self.DROP_REASONS,
                 "Output a caller will never get, by reason: absent_reader (its connection was gone and the "
                 "buffer full), overflow (past the buffer while the VM was held), lost (never reached "
                 "corrald), late (after the task's answer)"),
                ("corral_stream_stdin_refused", t.stdin_refused, "reason", self.STDIN_REFUSALS,
                 "TaskStdin frames cut or ignored, by reason (over_cap, held_total: cut and the stdin closed)"),
                ("corral_stream_attaches", t.attaches, "result", self.ATTACH_RESULTS,
                 "TaskAttach frames, by result")):
            family = CounterMetricFamily(name, help_text, labels=[label])
            for value in values:
                family.add_metric([value], float(counts.get(value, 0)))
            yield family


class PoolVmCollector:
    def __init__(self, view):
        self.view = view

    def collect(self):
        family = GaugeMetricFamily("corral_vm_state", "1 for each live VM, labelled with its state",
                                   labels=["vm", "state"])
        for vm_id, state in sorted(self.view.states.items()):
            family.add_metric([vm_id, state], 1)
        yield family


class BudgetCollector:
    """Cost budgets per identity: remaining now (it refills between scrapes,
    so it is computed when asked, not set when spent), charged and refunded."""

    def __init__(self, snapshot):
        self.snapshot = snapshot

    def collect(self):
        remaining = GaugeMetricFamily("corral_budget_remaining", "Cost units an identity can spend now",
                                      labels=["identity"])
        spent = CounterMetricFamily("corral_budget_spent", "Cost units charged to an identity "
                                    "(refunds included; see corral_budget_refunded_total)", labels=["identity"])
        refunded = CounterMetricFamily("corral_budget_refunded", "Cost units given back for tasks that "
                                       "never reached a VM", labels=["identity"])
        for name, (left, charged, given_back) in sorted(self.snapshot().items()):
            remaining.add_metric([name], left)
            spent.add_metric([name], charged)
            refunded.add_metric([name], given_back)
        yield remaining
        yield spent
        yield refunded
