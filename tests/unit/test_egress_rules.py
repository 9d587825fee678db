"""Egress rules, grants and the always-denied set (actors/egress/rules.py)."""

import ipaddress

import pytest

from actors.egress.rules import (DomainRule, EgressGrant, NetworkRule, RuleError, decide_address, host_addresses,
                                 matching_domain_rule, parse_rule, parse_rules)

ip = ipaddress.ip_address
NO_HOST = frozenset()


@pytest.mark.parametrize("text, shown", [
    ("pypi.org", "pypi.org"), ("PyPI.org.", "pypi.org"), ("*.pythonhosted.org", "*.pythonhosted.org"),
    ("10.1.2.0/24:5432", "10.1.2.0/24:5432"), ("203.0.113.7:7", "203.0.113.7:7"),
    ("198.51.100.0/24:1000-2000", "198.51.100.0/24:1000-2000"), ("[2001:db8::/32]:443", "[2001:db8::/32]:443"),
])
def test_rules_parse_to_their_normal_form(text, shown):
    assert str(parse_rule(text)) == shown


@pytest.mark.parametrize("text", [
    "", "*", "*.", "a.*.org", "exa mple.org", "-bad.org", "10.1.2.0/24", "10.1.2.3/24:5432", "10.1.2.0/24:0",
    "10.1.2.0/24:70000", "10.0.0.0/8:2000-1000", "1.2.3.4", "[::1]", "pypi.org:443", "x" * 300,
])
def test_bad_rules_are_refused_naming_the_rule(text):
    with pytest.raises(RuleError) as caught:
        parse_rule(text)
    assert repr(text)[1:20] in str(caught.value)  # the message names the rule


def test_domain_rules_match_names_and_wildcards_only_below():
    exact, wild = parse_rule("allowed.test"), parse_rule("*.pypi.org")
    assert exact.matches("allowed.test") and not exact.matches("x.allowed.test")
    assert wild.matches("files.pypi.org") and wild.matches("a.b.pypi.org")
    assert not wild.matches("pypi.org") and not wild.matches("evilpypi.org")
    rules = parse_rules([b"allowed.test"])
    assert matching_domain_rule(rules, "allowed.test", 443) == exact
    assert matching_domain_rule(rules, "allowed.test", 22) is None  # domain rules are HTTP(S) only


def test_grants_bound_requested_rules():
    grant = EgressGrant.parse(["*.pypi.org", "github.com", "10.0.0.0/8:5432", "203.0.113.0/24:1-65535"])
    for asked in ("files.pypi.org", "*.pypi.org", "*.a.pypi.org", "github.com", "10.1.2.0/24:5432",
                  "203.0.113.7:7"):
        assert grant.allows(parse_rule(asked)), asked
    for asked in ("pypi.org", "*.org", "api.github.com", "10.1.2.0/24:5433", "11.0.0.0/24:5432",
                  "203.0.112.0/23:7", "[2001:db8::/32]:443"):
        assert not grant.allows(parse_rule(asked)), asked
    assert EgressGrant.parse(["*"]).allows(parse_rule("anything.example"))
    assert not EgressGrant.parse([]).allows(parse_rule("anything.example"))


def test_never_reachable_whatever_the_rules():
    everything = parse_rules(["0.0.0.0/0:1-65535"])
    host = frozenset({ip("192.0.2.2")})
    for address in ("127.0.0.1", "169.254.169.254", "0.0.0.0", "224.0.0.1", "255.255.255.255", "192.0.2.2",
                    "::1", "fe80::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254"):
        decision = decide_address(everything, ip(address), 80, host)
        assert not decision.allowed, address


def test_private_ranges_only_through_a_cidr_rule_inside_them():
    via = DomainRule("allowed.test", False)
    assert not decide_address((via,), ip("10.1.2.3"), 443, NO_HOST, via_domain=via).allowed  # rebinding
    assert not decide_address(parse_rules(["0.0.0.0/0:443"]), ip("10.1.2.3"), 443, NO_HOST).allowed
    assert decide_address(parse_rules(["10.1.2.0/24:5432"]), ip("10.1.2.3"), 5432, NO_HOST).allowed
    assert not decide_address(parse_rules(["10.1.2.0/24:5432"]), ip("10.1.2.3"), 5433, NO_HOST).allowed
    assert decide_address((via,), ip("203.0.113.10"), 443, NO_HOST, via_domain=via).allowed
    assert not decide_address((via,), ip("203.0.113.10"), 22, NO_HOST, via_domain=via).allowed
    assert decide_address(parse_rules(["0.0.0.0/0:443"]), ip("203.0.113.10"), 443, NO_HOST).allowed


def test_host_addresses_read_from_the_kernel(tmp_path):
    fib = tmp_path / "fib_trie"
    fib.write_text("Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 192.0.2.2\n        /32 host LOCAL\n"
                   "     |-- 192.0.2.255\n        /32 link BROADCAST\n")
    inet6 = tmp_path / "if_inet6"
    inet6.write_text("fd000000000000000000000000000002 02 40 00 80 eth0\n")
    assert host_addresses(fib, inet6) == {ip("192.0.2.2"), ip("fd00::2")}
    assert ip("127.0.0.1") in host_addresses()  # this machine's own table
    assert isinstance(parse_rule("10.0.0.0/8:1"), NetworkRule)
