"""corral configuration: defaults from config/corral.toml, overridden by a site
file, every key checked against its type and range at start-up.

An error names the key, the bad value and what is allowed, e.g.
``config: vm.memory_mib = 64 is out of range (128..1048576)``.
"""

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULTS_FILE = Path(__file__).with_name("corral.toml")


class ConfigError(Exception):
    """A config value is missing, unknown, of the wrong type or out of range."""


def _range(lo: float, hi: float) -> dict:
    return {"range": (lo, hi)}


def _choices(*allowed: str) -> dict:
    return {"choices": allowed}


@dataclass(frozen=True)
class VmConfig:
    accelerator: str = field(metadata=_choices("auto", "kvm", "tcg"))
    memory_mib: int = field(metadata=_range(128, 1 << 20))
    vcpus: int = field(metadata=_range(1, 64))
    boot_timeout_s: float = field(metadata=_range(1, 600))
    tmpfs_size: str = field(metadata={"pattern": "size"})
    console_log: bool = field()
    libvirt_call_timeout_s: float = field(metadata=_range(1, 600))
    fast_resume: bool = field()
    # Hard capabilities (docs/capabilities.md): the res:large_mem tier's memory, and
    # the CPU shares and vCPU quota (% of one CPU; 0: none) of default and res:high_cpu tasks.
    large_memory_mib: int = field(metadata=_range(128, 1 << 20))
    cpu_shares: int = field(metadata=_range(2, 262144))
    cpu_quota_pct: int = field(metadata=_range(0, 100))
    high_cpu_shares: int = field(metadata=_range(2, 262144))
    high_cpu_quota_pct: int = field(metadata=_range(0, 100))


@dataclass(frozen=True)
class SnapshotsConfig:
    # Refill from snapshot templates (actors/vm/snapshots.py); false: cold boots only.
    enabled: bool = field()


@dataclass(frozen=True)
class DaemonConfig:
    endpoint: str = field(metadata={"pattern": "endpoint"})
    instance: str = field(metadata={"pattern": "instance"})
    log_level: str = field(metadata=_choices("debug", "info", "warning", "error"))
    log_format: str = field(metadata=_choices("text", "json"))
    shutdown_grace_s: float = field(metadata=_range(0, 3600))
    # Callers connected at once; past it new connections are shed (actors/edge/connections.py).
    max_connections: int = field(metadata=_range(1, 1_000_000))


@dataclass(frozen=True)
class ControlConfig:
    endpoint: str = field(metadata={"pattern": "ipc_endpoint"})
    faults: bool = field()
    scram_pause_timeout_s: float = field(metadata=_range(0.1, 600))
    max_connections: int = field(metadata=_range(1, 100_000))  # operators' connections at once


@dataclass(frozen=True)
class MetricsConfig:
    address: str = field()
    port: int = field(metadata=_range(0, 65535))


@dataclass(frozen=True)
class PoolConfig:
    size: int = field(metadata=_range(0, 256))
    max_uses: int = field(metadata=_range(1, 1_000_000))
    max_age_s: float = field(metadata=_range(1, 86400))
    strict: bool = field()
    acquire_timeout_s: float = field(metadata=_range(0.1, 600))
    reset_timeout_s: float = field(metadata=_range(0.1, 600))
    boot_backoff_max_s: float = field(metadata=_range(0.1, 3600))
    settle_ms: int = field(metadata=_range(0, 5000))
    # VMs of a hard-capability tier (net:egress, res:large_mem): kept warm, at most
    # booted for waiting tasks, and how long one may idle before it is retired.
    tier_size: int = field(metadata=_range(0, 256))
    tier_max: int = field(metadata=_range(1, 256))
    tier_idle_s: float = field(metadata=_range(1, 86400))


@dataclass(frozen=True)
class TasksConfig:
    queue_depth: int = field(metadata=_range(1, 1_000_000))
    busy_retry_after_s: float = field(metadata=_range(0, 3600))
    default_timeout_s: float = field(metadata=_range(0.1, 86400))
    max_timeout_s: float = field(metadata=_range(0.1, 86400))
    default_output_cap: int = field(metadata=_range(0, 16 << 20))
    max_output_cap: int = field(metadata=_range(0, 16 << 20))
    deadman_grace_s: float = field(metadata=_range(0.1, 600))
    # An Exec must fit a 16 MiB frame: requests stay 64 KiB below it.
    max_request_bytes: int = field(metadata=_range(4096, (16 << 20) - (64 << 10)))
    max_queued_bytes: int = field(metadata=_range(1 << 20, 1 << 40))
    max_queue_wait_s: float = field(metadata=_range(1, 86400))
    # Soft capabilities every task holds without asking for them.
    default_capabilities: list = field(metadata={"pattern": "soft_capabilities"})
    # Streaming tasks (actors/edge/streams.py): output sent to a caller beyond
    # what it acknowledged; output held per task before its VM's channel is held;
    # how long an ended task's undelivered output and reply wait for the caller.
    stream_window_bytes: int = field(metadata=_range(4096, 16 << 20))
    stream_buffer_bytes: int = field(metadata=_range(64 << 10, 1 << 30))
    stream_linger_s: float = field(metadata=_range(0, 3600))
    # All stdin of one task (TaskRequest.stdin and every TaskStdin); at most the guest's MAX_STDIN.
    max_stdin_bytes: int = field(metadata=_range(0, 8 << 20))


@dataclass(frozen=True)
class SessionsConfig:
    # Sessions open or opening at once, per identity and in all; 0 turns sessions off.
    # Each holds a VM outside the pool (docs/operations.md, "Sessions").
    max_per_identity: int = field(metadata=_range(0, 256))
    max_total: int = field(metadata=_range(0, 256))
    # Idle timeout and lifetime (s) of a session that asks for none (0), and the most it may ask for.
    default_idle_s: int = field(metadata=_range(1, 7 * 86400))
    max_idle_s: int = field(metadata=_range(1, 7 * 86400))
    default_life_s: int = field(metadata=_range(1, 30 * 86400))
    max_life_s: int = field(metadata=_range(1, 30 * 86400))


@dataclass(frozen=True)
class ArtifactsConfig:
    # One PutFile must fit the guest's frame; one reply's files its 16 MiB bound.
    max_put_bytes: int = field(metadata=_range(0, 12 << 20))
    max_collect_bytes: int = field(metadata=_range(0, 16 << 20))
    collect_timeout_s: float = field(metadata=_range(1, 3600))
    key_file: str = field()

    def key_path(self, state_dir: Path) -> Path:
        return Path(self.key_file) if self.key_file else state_dir / "keys" / "receipt.key"


@dataclass(frozen=True)
class IoGuardConfig:
    burst_bytes: int = field(metadata=_range(4096, 1 << 30))
    rate_bytes_per_s: int = field(metadata=_range(1024, 1 << 30))
    frames_per_s: int = field(metadata=_range(1, 1_000_000))
    frames_burst: int = field(metadata=_range(1, 1_000_000))
    # A frame in progress gets this plus its length at rate_bytes_per_s (stalled_frame past it).
    frame_stall_s: float = field(metadata=_range(0.1, 600))
    # Frames in progress across all channels; at least the largest guest frame, or it could never start.
    max_partial_bytes: int = field(metadata=_range(2 << 20, 1 << 40))


@dataclass(frozen=True)
class SupervisionConfig:
    max_restarts: int = field(metadata=_range(0, 1000))
    window_s: float = field(metadata=_range(1, 86400))


@dataclass(frozen=True)
class WatchdogConfig:
    interval_s: float = field(metadata=_range(0.1, 3600))
    min_available_mib: int = field(metadata=_range(0, 1 << 30))


@dataclass(frozen=True)
class IdentityConfig:
    # "" : no CurveZMQ on the client socket; every caller is the local identity.
    server_secret_key: str = field()
    client_keys_dir: str = field()
    clients: dict[str, str] = field(metadata={"keys": "name"})  # name -> Z85 public key
    local_name: str = field(metadata={"pattern": "name"})
    local_grants: tuple[str, ...] = field()
    default_grants: tuple[str, ...] = field()
    grants: dict[str, tuple[str, ...]] = field(metadata={"keys": "name"})
    # Egress rules (docs/egress.md) an identity may ask for; "*": any rule.
    local_egress_allow: tuple[str, ...] = field(metadata={"pattern": "egress_grants"})
    default_egress_allow: tuple[str, ...] = field(metadata={"pattern": "egress_grants"})
    egress_allow: dict[str, tuple[str, ...]] = field(metadata={"keys": "name", "pattern": "egress_grants"})


@dataclass(frozen=True)
class EgressConfig:
    # Rules of a net:egress task that names none (docs/egress.md); [] : it reaches nothing.
    default_allow: tuple[str, ...] = field(metadata={"pattern": "egress_rules"})
    resolver: str = field(metadata={"pattern": "resolver"})  # "": the host's resolver; else IP[:PORT]
    connect_timeout_s: float = field(metadata=_range(0.1, 600))
    resolve_timeout_s: float = field(metadata=_range(0.1, 600))
    request_timeout_s: float = field(metadata=_range(0.1, 3600))


@dataclass(frozen=True)
class PriorityCosts:
    critical: float = field(metadata=_range(0, 10**9))
    high: float = field(metadata=_range(0, 10**9))
    normal: float = field(metadata=_range(0, 10**9))
    low: float = field(metadata=_range(0, 10**9))


@dataclass(frozen=True)
class BudgetLimits:
    capacity: float = field(metadata=_range(0, 10**12))
    refill_per_s: float = field(metadata=_range(0, 10**12))


@dataclass(frozen=True)
class BudgetConfig:
    capacity: float = field(metadata=_range(0, 10**12))
    refill_per_s: float = field(metadata=_range(0, 10**12))
    priority_costs: PriorityCosts = field()
    capability_costs: dict[str, float] = field(metadata=_range(0, 10**9))
    overrides: dict[str, BudgetLimits] = field(metadata={"keys": "name"})


@dataclass(frozen=True)
class Config:
    state_dir: Path = field()
    libvirt_uri: str = field()
    vm: VmConfig = field()
    snapshots: SnapshotsConfig = field()
    daemon: DaemonConfig = field()
    control: ControlConfig = field()
    metrics: MetricsConfig = field()
    pool: PoolConfig = field()
    tasks: TasksConfig = field()
    sessions: SessionsConfig = field()
    artifacts: ArtifactsConfig = field()
    ioguard: IoGuardConfig = field()
    supervision: SupervisionConfig = field()
    watchdog: WatchdogConfig = field()
    identity: IdentityConfig = field()
    budget: BudgetConfig = field()
    egress: EgressConfig = field()


def _check_size(key: str, value: str) -> None:
    """tmpfs size: N%, or a number with k/m/g (what mount -o size= accepts)."""
    body, unit = value[:-1], value[-1:]
    if not (value.isdigit() or (unit in "%kKmMgG" and body.isdigit())):
        raise ConfigError(f"config: {key} = {value!r} is not a size (e.g. 50% or 256m)")


def _check_endpoint(key: str, value: str) -> None:
    if not value.startswith(("ipc:///", "tcp://")):
        raise ConfigError(f"config: {key} = {value!r} must be an ipc:///path or tcp://host:port endpoint")


def _check_ipc_endpoint(key: str, value: str) -> None:
    if not value.startswith("ipc:///"):
        raise ConfigError(f"config: {key} = {value!r} must be an ipc:///path endpoint "
                          "(file permissions decide who is an operator)")


def _check_instance(key: str, value: str) -> None:
    if not (1 <= len(value) <= 16 and value.isascii() and value.isalnum() and value.islower()):
        raise ConfigError(f"config: {key} = {value!r} must be 1 to 16 lower-case letters or digits")


def _check_name(key: str, value: str) -> None:
    """Identity names: they label metrics and travel as the ZAP User-Id."""
    if not (1 <= len(value) <= 32 and value.isascii()
            and all(ch.isalnum() or ch in "-_." for ch in value) and value[0].isalnum()):
        raise ConfigError(f"config: {key} = {value!r} must be 1 to 32 letters, digits, '-', '_' or '.'")


def _check_soft_capabilities(key: str, value: list) -> None:
    from protocol.channel.capabilities import SOFT

    for name in value:
        if name not in SOFT:
            raise ConfigError(f"config: {key} has {name!r}, not a soft capability "
                              f"(one of {', '.join(SOFT)})")
    if len(set(value)) != len(value):
        raise ConfigError(f"config: {key} names a capability twice")


def _check_egress_rules(key: str, value: tuple, grants: bool = False) -> None:
    from actors.egress.rules import ANY_RULE, RuleError, parse_rule

    for rule in value:
        if grants and rule == ANY_RULE:
            continue
        try:
            parse_rule(rule)
        except RuleError as e:
            raise ConfigError(f"config: {key}: {e}") from None


def _check_egress_grants(key: str, value: tuple) -> None:
    _check_egress_rules(key, value, grants=True)


def _check_resolver(key: str, value: str) -> None:
    from actors.egress.proxy import parse_resolver

    try:
        parse_resolver(value)
    except ValueError as e:
        raise ConfigError(f"config: {key} = {value!r} must be \"\" or an address with an optional port "
                          f"(198.51.100.53, 198.51.100.53:5353, [2001:db8::53]:53): {e}") from None


CHECKS = {"egress_rules": _check_egress_rules, "egress_grants": _check_egress_grants, "resolver": _check_resolver,
          "size": _check_size, "endpoint": _check_endpoint, "ipc_endpoint": _check_ipc_endpoint,
          "instance": _check_instance, "name": _check_name, "soft_capabilities": _check_soft_capabilities}


def _convert(key: str, f: dataclasses.Field, value: Any) -> Any:
    return _convert_value(key, f.type, f.metadata, value)


def _convert_value(key: str, kind: Any, meta: dict, value: Any) -> Any:
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise ConfigError(f"config: [{key}] must be a table")
        return _build(kind, value, key + ".")
    if typing.get_origin(kind) is dict:
        # A table of any names: `meta["keys"]` checks the names, the rest each value.
        if not isinstance(value, dict):
            raise ConfigError(f"config: [{key}] must be a table")
        item_kind = typing.get_args(kind)[1]
        item_meta = {k: v for k, v in meta.items() if k != "keys"}
        if "keys" in meta:
            for name in value:
                CHECKS[meta["keys"]](f"{key} name", name)
        return {name: _convert_value(f"{key}.{name}", item_kind, item_meta, item)
                for name, item in value.items()}
    if typing.get_origin(kind) is tuple:
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ConfigError(f"config: {key} = {value!r} must be a list of strings")
        if "pattern" in meta:
            CHECKS[meta["pattern"]](key, tuple(value))
        return tuple(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    expected = str if kind is Path else kind
    if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
        raise ConfigError(f"config: {key} = {value!r} must be of type {expected.__name__}")
    if "range" in meta:
        lo, hi = meta["range"]
        if not lo <= value <= hi:
            raise ConfigError(f"config: {key} = {value!r} is out of range ({lo}..{hi})")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"config: {key} = {value!r} must be one of {', '.join(meta['choices'])}")
    if "pattern" in meta:
        CHECKS[meta["pattern"]](key, value)
    return Path(value) if kind is Path else value


def _build(cls: type, table: dict, prefix: str = "") -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(f"config: unknown key {prefix}{unknown[0]} (known: {', '.join(fields)})")
    missing = sorted(set(fields) - set(table))
    if missing:
        raise ConfigError(f"config: missing key {prefix}{missing[0]}")
    return cls(**{name: _convert(prefix + name, f, table[name]) for name, f in fields.items()})


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = _merge(base[key], value)
        else:
            merged[key] = value
    return merged


def _read(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config: file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config: {path} is not valid TOML: {e}") from None


def _check_sessions(sessions: SessionsConfig) -> None:
    for default, most in (("default_idle_s", "max_idle_s"), ("default_life_s", "max_life_s"),
                          ("max_per_identity", "max_total")):
        if getattr(sessions, default) > getattr(sessions, most):
            raise ConfigError(f"config: sessions.{default} = {getattr(sessions, default)} must not exceed "
                              f"sessions.{most} = {getattr(sessions, most)}")


def load(path: "Path | None" = None, overrides: "dict | None" = None) -> Config:
    """The defaults, then the site file at `path`, then `overrides` (tests, flags)."""
    table = _read(DEFAULTS_FILE)
    if path is not None:
        table = _merge(table, _read(Path(path)))
    if overrides:
        table = _merge(table, overrides)
    cfg = _build(Config, table)
    if cfg.tasks.default_timeout_s > cfg.tasks.max_timeout_s:
        raise ConfigError("config: tasks.default_timeout_s must not exceed tasks.max_timeout_s")
    if cfg.tasks.default_output_cap > cfg.tasks.max_output_cap:
        raise ConfigError("config: tasks.default_output_cap must not exceed tasks.max_output_cap")
    if cfg.tasks.stream_buffer_bytes < cfg.tasks.stream_window_bytes:
        raise ConfigError("config: tasks.stream_buffer_bytes must be at least tasks.stream_window_bytes "
                          "(the buffer holds what was sent until it is acknowledged)")
    if cfg.control.endpoint == cfg.daemon.endpoint:
        raise ConfigError("config: control.endpoint must differ from daemon.endpoint")
    if cfg.artifacts.max_put_bytes > cfg.tasks.max_request_bytes:
        raise ConfigError("config: artifacts.max_put_bytes must not exceed tasks.max_request_bytes "
                          "(files to put travel in the request)")
    if cfg.pool.tier_size > cfg.pool.tier_max:
        raise ConfigError("config: pool.tier_size must not exceed pool.tier_max")
    _check_sessions(cfg.sessions)
    # A vCPU over its quota sleeps up to (100 - quota) % of the 1 s period, mid-frame
    # perhaps: an honest guest must not be ended as stalled for that.
    quotas = [q for q in (cfg.vm.cpu_quota_pct, cfg.vm.high_cpu_quota_pct) if q]
    longest_pause_s = (100 - min(quotas)) / 100 if quotas else 0.0
    if cfg.ioguard.frame_stall_s < 2 * longest_pause_s:
        raise ConfigError(f"config: ioguard.frame_stall_s = {cfg.ioguard.frame_stall_s:g} must be at least "
                          f"twice the longest vCPU pause the CPU quotas allow ({longest_pause_s:g} s)")
    return cfg
