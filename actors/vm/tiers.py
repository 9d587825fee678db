"""Hardware tiers: what a VM is booted with for the hard capabilities that
cannot change on a running VM (docs/capabilities.md).

`net:egress` needs a NIC and `res:large_mem` a larger memory size; neither can
be added to a warm, paused VM here (every PCI device sits on the root complex,
which has no hotplug, and there is no balloon), so the pool keeps VMs per tier
and the Scheduler gives each task a VM of its tier. `res:high_cpu` is not a
tier: CPU shares and quota are set live on any VM before it is resumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from protocol.channel.capabilities import NET_EGRESS, RES_HIGH_CPU, RES_LARGE_MEM


@dataclass(frozen=True, order=True)
class Tier:
    network: bool = False
    large_mem: bool = False

    @property
    def label(self) -> str:
        parts = [name for name, held in (("net", self.network), ("large_mem", self.large_mem)) if held]
        return "+".join(parts) or "default"


DEFAULT_TIER = Tier()
RARE_TIERS = (Tier(network=True), Tier(large_mem=True), Tier(network=True, large_mem=True))


@lru_cache(maxsize=256)
def tier_of(capabilities: tuple[bytes, ...]) -> Tier:
    """The tier of VM a task with these (validated) capability names needs."""
    return Tier(network=NET_EGRESS.encode() in capabilities,
                large_mem=RES_LARGE_MEM.encode() in capabilities)


def wants_high_cpu(capabilities: tuple[bytes, ...]) -> bool:
    return RES_HIGH_CPU.encode() in capabilities
