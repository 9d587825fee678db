"""Egress rules: what a task may reach, what an identity may ask for, and the
addresses no rule opens (docs/egress.md).

A rule is one of:
  - a domain name, or `*.` and a domain (any name below it, not the domain
    itself): HTTP and HTTPS to it, ports 80 and 443;
  - an address or CIDR block with a port or port range: `10.1.2.0/24:5432`,
    `203.0.113.7:7`, `[2001:db8::/32]:443`, `198.51.100.0/24:1000-2000`: TCP.

Pure functions and frozen values: Intake checks requests and grants with them,
the proxy decides each connection with them.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

WEB_PORTS = frozenset({80, 443})
ANY_RULE = "*"  # in grants: any rule (the always-denied set still applies)
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
MAX_NAME_LEN = 253

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Never reachable, whatever the rules: loopback, link-local (169.254.169.254, the
# usual metadata service, included), "this network", multicast, reserved and
# broadcast. The host's own addresses are added at run time (host_addresses()).
NEVER = tuple(ipaddress.ip_network(n) for n in (
    "127.0.0.0/8", "169.254.0.0/16", "0.0.0.0/8", "224.0.0.0/4", "240.0.0.0/4",
    "::1/128", "::/128", "fe80::/10", "ff00::/8"))
# Private and shared ranges: reachable only through a CIDR rule whose block lies
# inside one of them (it names them explicitly); never through a domain rule, so
# a name that resolves into an internal network (DNS rebinding) gets nowhere.
PRIVATE = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7"))


class RuleError(ValueError):
    """A rule that does not parse; the message names it."""


@dataclass(frozen=True)
class DomainRule:
    name: str  # lower case, without the "*."
    wildcard: bool

    def __str__(self) -> str:
        return f"*.{self.name}" if self.wildcard else self.name

    def matches(self, host: str) -> bool:
        return host.endswith("." + self.name) if self.wildcard else host == self.name

    def within(self, grant: DomainRule) -> bool:
        """Every name this rule allows, `grant` allows too."""
        if grant.wildcard:
            return self.name.endswith("." + grant.name) or (self.wildcard and self.name == grant.name)
        return not self.wildcard and self.name == grant.name


@dataclass(frozen=True)
class NetworkRule:
    network: IPNetwork
    first_port: int
    last_port: int

    def __str__(self) -> str:
        net = str(self.network) if self.network.prefixlen < self.network.max_prefixlen \
            else str(self.network.network_address)
        if self.network.version == 6:
            net = f"[{net}]"
        ports = str(self.first_port) if self.first_port == self.last_port else f"{self.first_port}-{self.last_port}"
        return f"{net}:{ports}"

    def matches(self, address: IPAddress, port: int) -> bool:
        return address in self.network and self.first_port <= port <= self.last_port

    def within(self, grant: NetworkRule) -> bool:
        return (self.network.version == grant.network.version and self.network.subnet_of(grant.network)
                and grant.first_port <= self.first_port and self.last_port <= grant.last_port)

    @property
    def names_private(self) -> bool:
        """The block lies inside a private range: it opens that range explicitly."""
        return any(self.network.version == p.version and self.network.subnet_of(p) for p in PRIVATE)


Rule = DomainRule | NetworkRule


def parse_host(text: str) -> str | None:
    """`text` as a normalised domain name (lower case, no trailing dot), or None."""
    name = text.lower().removesuffix(".")
    if not name or len(name) > MAX_NAME_LEN:
        return None
    if not all(_LABEL.fullmatch(label) for label in name.split(".")):
        return None
    if all(ch.isdigit() or ch == "." for ch in name):  # a dotted number is an address, not a name
        return None
    return name


def _port(text: str, rule: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise RuleError(f"egress rule {rule!r}: port {text!r} is not 1-65535")
    return int(text)


def parse_rule(text: str) -> Rule:
    """One rule from its text; RuleError naming it if it is not one."""
    raw = text.strip()
    if raw.startswith("[") or (":" in raw and not raw.startswith("*.")):
        if raw.startswith("["):
            net_text, sep, ports = raw[1:].partition("]:")
        else:
            net_text, sep, ports = raw.rpartition(":")
        if not sep or not ports:
            raise RuleError(f"egress rule {text!r}: an address or CIDR rule needs a port (e.g. 10.1.2.0/24:5432)")
        try:
            network = ipaddress.ip_network(net_text, strict=True)
        except ValueError as e:
            raise RuleError(f"egress rule {text!r}: {e}") from None
        first, dash, last = ports.partition("-")
        first_port = _port(first, text)
        last_port = _port(last, text) if dash else first_port
        if last_port < first_port:
            raise RuleError(f"egress rule {text!r}: port range {ports} runs backwards")
        return NetworkRule(network, first_port, last_port)
    if "/" in raw or all(ch.isdigit() or ch == "." for ch in raw) and raw:
        raise RuleError(f"egress rule {text!r}: an address or CIDR rule needs a port (e.g. 10.1.2.0/24:5432)")
    wildcard = raw.startswith("*.")
    name = parse_host(raw[2:] if wildcard else raw)
    if name is None or "*" in raw[2 if wildcard else 0:]:
        raise RuleError(f"egress rule {text!r} is neither a domain name (a *. prefix allowed) "
                        "nor ADDRESS[/BITS]:PORT[-PORT]")
    return DomainRule(name, wildcard)


def parse_rules(texts) -> tuple[Rule, ...]:
    """Rules from their texts (str or bytes), duplicates dropped, order kept."""
    rules: list[Rule] = []
    for text in texts:
        if isinstance(text, bytes):
            text = text.decode("ascii", errors="replace")
        rule = parse_rule(text)
        if rule not in rules:
            rules.append(rule)
    return tuple(rules)


@dataclass(frozen=True)
class EgressGrant:
    """The rules an identity may ask for: `everything` (config "*"), or each
    asked rule lies within one of `rules`."""

    rules: tuple[Rule, ...] = ()
    everything: bool = False

    @classmethod
    def parse(cls, texts) -> EgressGrant:
        texts = tuple(texts)
        return cls(parse_rules(t for t in texts if t != ANY_RULE), everything=ANY_RULE in texts)

    def allows(self, rule: Rule) -> bool:
        return self.everything or any(type(rule) is type(g) and rule.within(g) for g in self.rules)

    def __str__(self) -> str:
        return "any rule" if self.everything else (", ".join(map(str, self.rules)) or "none")


# --- the always-denied set -----------------------------------------------------------

def host_addresses(fib_trie: Path = Path("/proc/net/fib_trie"),
                   if_inet6: Path = Path("/proc/net/if_inet6")) -> frozenset[IPAddress]:
    """The host's own addresses, from the kernel's local routing table (IPv4:
    /proc/net/fib_trie's "/32 host LOCAL" entries) and /proc/net/if_inet6."""
    found: set[IPAddress] = set()
    try:
        last = None
        for line in fib_trie.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] in ("|--", "+--"):
                last = parts[1]
            elif "/32 host LOCAL" in line and last:
                found.add(ipaddress.ip_address(last.split("/")[0]))
    except (OSError, ValueError):
        pass
    try:
        for line in if_inet6.read_text().splitlines():
            hexaddr = line.split()[0]
            found.add(ipaddress.ip_address(int(hexaddr, 16)))
    except (OSError, ValueError, IndexError):
        pass
    return frozenset(found)


def plain(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (::ffff:a.b.c.d) is the IPv4 address it maps."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def never_reason(address: IPAddress, host: frozenset[IPAddress],
                 never: tuple[IPNetwork, ...] = NEVER) -> str:
    """Why no rule can open `address` ("" if a rule can)."""
    address = plain(address)
    if address in host:
        return f"{address} is an address of this host"
    for net in never:
        if address.version == net.version and address in net:
            return f"{address} is in {net}, which is never reachable"
    return ""


def private_range(address: IPAddress) -> IPNetwork | None:
    address = plain(address)
    return next((p for p in PRIVATE if address.version == p.version and address in p), None)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str  # why denied, or which rule allowed it
    addresses: tuple[IPAddress, ...] = ()


def decide_address(rules: tuple[Rule, ...], address: IPAddress, port: int, host: frozenset[IPAddress],
                   via_domain: DomainRule | None = None,
                   never: tuple[IPNetwork, ...] = NEVER) -> Decision:
    """May the task connect to address:port? Through a domain rule (`via_domain`,
    the name already matched) or else a CIDR rule."""
    address = plain(address)
    why = never_reason(address, host, never)
    if why:
        return Decision(False, why)
    cidr = next((r for r in rules if isinstance(r, NetworkRule) and r.matches(address, port)), None)
    private = private_range(address)
    if private is not None and (cidr is None or not cidr.names_private):
        return Decision(False, f"{address} is in the private range {private}, which only a CIDR rule "
                               "inside it opens")
    if cidr is not None:
        return Decision(True, f"rule {cidr}", (address,))
    if via_domain is not None and port in WEB_PORTS:
        return Decision(True, f"rule {via_domain}", (address,))
    return Decision(False, f"no rule allows {address}:{port}")


def matching_domain_rule(rules: tuple[Rule, ...], name: str, port: int) -> DomainRule | None:
    if port not in WEB_PORTS:
        return None
    return next((r for r in rules if isinstance(r, DomainRule) and r.matches(name)), None)
