"""Egress rules at Intake: syntax, the net:egress capability they need, the
identity's egress grants (capability_denied naming the rule) and
egress.default_allow for a request that names none."""

import pytest

import config
from actors.edge.identity import Admission, Identity
from actors.edge.intake_server import (KNOWN_CAPABILITIES, OFFERED_CAPABILITIES, TaskLimits, validate,
                                       with_default_egress)
from actors.egress.rules import EgressGrant
from actors.errors import CorralError, Rejected
from tests.support.intake import request as make_request

LIMITS = TaskLimits.from_config(config.load(overrides={"egress": {"default_allow": ["pypi.org"]}}))


def test_rules_need_net_egress_and_must_parse_and_are_normalised():
    with pytest.raises(Rejected, match="need capability net:egress") as e:
        validate(make_request(egress_allow=(b"pypi.org",)), LIMITS)
    assert e.value.code == "invalid_request"
    with pytest.raises(Rejected, match="egress rule 'pypi org'") as e:
        validate(make_request(capabilities=(b"net:egress",), egress_allow=(b"pypi org",)), LIMITS)
    assert e.value.code == "invalid_request"
    ok = validate(make_request(capabilities=(b"net:egress",), egress_allow=(b"PyPI.org", b"pypi.org")), LIMITS)
    assert ok.egress_allow == (b"pypi.org",)


def test_a_net_egress_request_without_rules_gets_the_default_after_the_grant_check():
    plain = validate(make_request(capabilities=(b"net:egress",)), LIMITS)
    assert plain.egress_allow == () and with_default_egress(plain, LIMITS).egress_allow == (b"pypi.org",)
    asked = validate(make_request(capabilities=(b"net:egress",), egress_allow=(b"x.test",)), LIMITS)
    assert with_default_egress(asked, LIMITS).egress_allow == (b"x.test",)
    assert with_default_egress(validate(make_request(), LIMITS), LIMITS).egress_allow == ()


def test_a_rule_beyond_the_identitys_egress_grants_is_capability_denied_naming_it():
    alice = Identity("alice", frozenset({"net:egress"}), EgressGrant.parse(["*.pypi.org", "github.com"]))
    alice.check(validate(make_request(capabilities=(b"net:egress",), egress_allow=(b"files.pypi.org",)), LIMITS))
    with pytest.raises(Rejected) as e:
        alice.check(validate(make_request(capabilities=(b"net:egress",),
                                          egress_allow=(b"github.com", b"denied.test")), LIMITS))
    assert e.value.code == "capability_denied"
    assert "egress rule 'denied.test' is not granted to identity 'alice'" in str(e.value)
    assert "*.pypi.org, github.com" in str(e.value)


def test_egress_grants_come_from_config():
    local = Admission.from_config(config.load(overrides={"identity": {"local_egress_allow": ["allowed.test"]}}),
                                  KNOWN_CAPABILITIES, OFFERED_CAPABILITIES).identity_of(None)
    assert str(local.egress) == "allowed.test"
    assert Admission.from_config(config.load(), KNOWN_CAPABILITIES, OFFERED_CAPABILITIES
                                 ).identity_of(None).egress.everything  # the local default: "*"
    with pytest.raises(CorralError, match="identity.egress_allow needs identity.server_secret_key"):
        Admission.from_config(config.load(overrides={"identity": {"egress_allow": {"alice": ["x.test"]}}}),
                              KNOWN_CAPABILITIES, OFFERED_CAPABILITIES)
