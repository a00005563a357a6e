"""Credential material and selection: real proxies, tokens and keys read from their fields, then chosen per entry."""

from __future__ import annotations

import time

import pytest

from airflow_glidein import credentials as C
from airflow_glidein import material as M
from airflow_glidein.config import ConfigError, parse_config
from airflow_glidein.material import ConnFields, Validity
from tests import pki
from tests.helpers import jwt_token

NOW = time.time()


@pytest.fixture(scope="module")
def ca():
    return pki.CA()


def x509(pem: str) -> ConnFields:
    return ConnFields("glidein_x509", extra={"proxy": pem})


def token(tok: str) -> ConnFields:
    return ConnFields("glidein_token", password=tok)


# -- reading x509 proxies ------------------------------------------------------


def test_valid_proxy_reports_subject_not_after_and_remaining_lifetime(ca):
    pem = ca.proxy("Alice", hours=30)
    v = M.inspect("x509_proxy", x509(pem), NOW)
    assert v.ok, v.reason
    assert v.info["subject"] == pki.subject_of(pem) and "CN=Alice" in v.info["subject"]
    assert v.info["issuer"] == "CN=Alice,O=Glidein Test" and v.info["chain"] == 2
    assert 30 * 3600 - 120 < v.remaining <= 30 * 3600
    assert M.describe(v).startswith("30.0 h left; subject=")


def test_proxy_lives_only_as_long_as_its_shortest_link(ca):
    v = M.inspect("x509_proxy", x509(ca.proxy(hours=48, user_hours=5)), NOW)
    assert v.ok and 5 * 3600 - 120 < v.remaining <= 5 * 3600


def swap_key(pem: str, key: str) -> str:
    return pem.replace(pki.private_key_pem(pem), key)


@pytest.mark.parametrize("make, reason", [
    (lambda ca: ca.proxy(hours=-2), "expired 2.0 h ago"),
    (lambda ca: ca.proxy(start_hours=3, hours=24), "not valid before"),
    (lambda ca: ca.proxy()[:200], "malformed PEM: no readable certificate"),
    (lambda ca: "just some text, not PEM at all", "malformed PEM: no readable certificate"),
    (lambda ca: swap_key(ca.proxy(), ""), "no private key"),
    (lambda ca: ca.proxy(passphrase=b"pass-phrase"), "the private key is encrypted"),
    (lambda ca: ca.proxy().replace("-----BEGIN PRIVATE KEY-----\n", "-----BEGIN PRIVATE KEY-----\nAAAA"),
     "malformed PEM: the private key cannot be read"),
    (lambda ca: swap_key(ca.proxy(), pki.private_key_pem(ca.proxy())), "does not belong to the first certificate"),
])
def test_unusable_proxies_are_refused_with_a_reason_that_quotes_nothing(ca, make, reason):
    pem = make(ca)
    v = M.inspect("x509_proxy", x509(pem), NOW)
    assert not v.ok and reason in v.reason
    assert not any(len(line) >= 8 and line in v.reason for line in pem.splitlines())


def test_proxy_in_the_wrong_kind_of_connection_is_refused(ca):
    v = M.inspect("x509_proxy", ConnFields("aws", extra={"proxy": ca.proxy()}), NOW)
    assert not v.ok and v.reason == "connection type is 'aws'; a x509_proxy needs glidein_x509 or generic"


# -- tokens, keys, cloud accounts ----------------------------------------------


def test_token_with_exp_reports_issuer_audience_and_lifetime():
    tok = jwt_token({"iss": "https://cms-auth.example.org", "aud": "cm.example.org", "exp": int(NOW) + 7200,
                     "scope": "condor:/READ condor:/ADVERTISE_STARTD"})
    v = M.inspect("scitoken", token(tok), NOW)
    assert v.ok and 7190 < v.remaining <= 7200
    assert v.info["iss"] == "https://cms-auth.example.org" and v.info["aud"] == "cm.example.org"


def test_token_without_exp_does_not_expire():
    v = M.inspect("idtoken", token(jwt_token({"iss": "cm.example.org", "sub": "pilot"})), NOW)
    assert v.ok and v.remaining is None and v.info["exp"] is None


@pytest.mark.parametrize("tok, reason", [
    (jwt_token({"iss": "x", "exp": int(NOW) - 60}), "expired 60 s ago"),
    (jwt_token({"iss": "x", "nbf": int(NOW) + 3600}), "not valid before"),
    (jwt_token({"iss": "x", "exp": "tomorrow"}), "the exp claim is not a number"),
    ("opaque-secret-value-123", "not a JWT (expected header.claims.signature)"),
    ("bm90IGpzb24.bm90IGpzb24.c2ln", "not a JWT (header or claims are not base64url JSON)"),
    ("", "no token in the connection"),
])
def test_unusable_tokens_are_refused(tok, reason):
    v = M.inspect("idtoken", token(tok), NOW)
    assert not v.ok and reason in v.reason
    assert not tok or tok not in v.reason


def test_ssh_key_is_read_and_fingerprinted():
    v = M.inspect("ssh_key", ConnFields("glidein_ssh", login="glidein", extra={"private_key": pki.ssh_private_key()}), NOW)
    assert v.ok and v.info["key_name"] == "glidein" and v.info["fingerprint"].startswith("SHA256:")
    bad = M.inspect("ssh_key", ConnFields("glidein_ssh", extra={"private_key": "-----BEGIN OPENSSH PRIVATE KEY-----\nxx"}), NOW)
    assert not bad.ok and bad.reason == "malformed private key"


@pytest.mark.parametrize("cred_type, conn, ok, reason", [
    ("ec2_key_pair", ConnFields("aws", login="AKIAEXAMPLE1234", password="s3cr3t-s3cr3t"), True, ""),
    ("ec2_key_pair", ConnFields("aws"), True, ""),  # the Amazon provider's default chain
    ("ec2_key_pair", ConnFields("aws", login="AKIAEXAMPLE1234"), False, "an access key id without its secret"),
    ("openstack_app_credential", ConnFields("glidein_openstack", host="https://keystone:5000/v3", login="appcred-id",
                                            password="appcred-secret"), True, ""),
    ("openstack_app_credential", ConnFields("glidein_openstack", host="keystone:5000", login="a", password="b"),
     False, "the host field must be the Keystone auth URL"),
    ("openstack_app_credential", ConnFields("glidein_openstack", host="https://k/v3", login="a", password="b",
                                            extra={"auth_type": "password"}),
     False, "the connection's auth_type is 'password'; a openstack_app_credential needs 'application_credential'"),
    ("openstack_password", ConnFields("glidein_openstack", host="https://k/v3", login="u", password="p"),
     False, "password auth needs extra.project_name or extra.project_id"),
    ("openstack_password", ConnFields("glidein_openstack", host="https://k/v3", login="u", password="p",
                                      extra={"project_name": "cms"}), True, ""),
    ("opennebula_password", ConnFields("glidein_opennebula", host="http://one:2633/RPC2", login="oneadmin",
                                       password="pw-12345"), True, ""),
    ("opennebula_password", ConnFields("glidein_opennebula", host="http://one:2633/RPC2", login="oneadmin"),
     False, "login (user) and password are both required"),
])
def test_cloud_accounts_need_their_fields(cred_type, conn, ok, reason):
    v = M.inspect(cred_type, conn, NOW)
    assert v.ok == ok and reason in v.reason
    assert v.remaining is None or not ok


def test_declared_expiry_caps_material_that_cannot_tell_its_own():
    conn = ConnFields("glidein_openstack", host="https://k/v3", login="id", password="secret",
                      extra={"expires_at": "2000-01-01T00:00:00Z"})
    v = M.inspect("openstack_app_credential", conn, NOW)
    assert not v.ok and "expired" in v.reason and "2000-01-01T00:00:00Z" in v.reason
    soon = M.inspect("opennebula_password", ConnFields("glidein_opennebula", host="http://one/RPC2", login="u",
                                                       password="p", extra={"expires_at": NOW + 3600}), NOW)
    assert soon.ok and 3590 < soon.remaining <= 3600


def test_openstack_and_opennebula_arguments_for_the_hooks():
    app = ConnFields("glidein_openstack", host="https://k/v3", login="id", password="sec", extra={"region_name": "RegionOne"})
    assert M.openstack_auth("openstack_app_credential", app) == {
        "auth_type": "v3applicationcredential", "region_name": "RegionOne",
        "auth": {"auth_url": "https://k/v3", "application_credential_id": "id", "application_credential_secret": "sec"}}
    pw = ConnFields("glidein_openstack", host="https://k/v3", login="u", password="p", extra={"project_id": "abc"})
    assert M.openstack_auth("openstack_password", pw)["auth"] == {
        "auth_url": "https://k/v3", "username": "u", "password": "p", "user_domain_name": "Default",
        "project_domain_name": "Default", "project_id": "abc"}
    assert M.opennebula_session(ConnFields("glidein_opennebula", host="http://one/RPC2", login="u", password="p")) == (
        "http://one/RPC2", "u:p")


def test_secret_values_are_key_blocks_whole_secrets_and_token_signatures(ca):
    pem = ca.proxy()
    assert M.secret_values(x509(pem)) == [pki.private_key_pem(pem)]  # certificates are public
    tok = jwt_token({"iss": "x"}, signature="a-signature-of-some-length")
    assert M.secret_values(token(tok)) == [tok, "a-signature-of-some-length"]
    aws = ConnFields("aws", login="AKIA1", password="pw-secret", extra={"aws_session_token": "session-tok"})
    assert M.secret_values(aws) == ["pw-secret", "session-tok"]


def test_pilot_payload_is_the_token_or_the_proxy(ca):
    pem = ca.proxy()
    assert M.pilot_payload("x509_proxy", x509(pem)) == pem.strip()
    assert M.pilot_payload("idtoken", token(" abc.def.ghi ")) == "abc.def.ghi"
    with pytest.raises(ValueError, match="a ec2_key_pair is not handed to pilots"):
        M.pilot_payload("ec2_key_pair", ConnFields("aws"))


# -- selection -------------------------------------------------------------------


def config(**over) -> dict:
    cfg = {
        "factory": {"name": "f", "bootstrap_url": "http://127.0.0.1/glidein"},
        "entries": [
            {"name": "east", "middleware": "ec2", "region": "us-east-1", "image": "ami-1", "flavor": "c5.large",
             "trust_domain": "aws", "auth_method": "key_pair", "policy": {"max_lifetime": 43200}},
            {"name": "west", "middleware": "ec2", "region": "us-west-2", "image": "ami-2", "flavor": "c5.large",
             "trust_domain": "aws", "auth_method": "key_pair+vm_id+vm_type", "allow_vo_image": True},
            {"name": "cern", "middleware": "openstack", "image": "cc7", "flavor": "m1.large",
             "trust_domain": "cern", "auth_method": "app_credential"},
        ],
        "frontends": [{"name": "cms", "demand": {"queue_file": "q.json"}, "entries": ["east", "west", "cern"],
                       "credentials": ["aws-a", "aws-b", "tok", "cern-app", "cern-proxy"], "vo_image": "ami-vo"}],
        "credentials": [
            {"id": "aws-a", "type": "ec2_key_pair", "conn_id": "a", "trust_domain": "aws", "purpose": "provision"},
            {"id": "aws-b", "type": "ec2_key_pair", "conn_id": "b", "trust_domain": "aws", "purpose": "provision"},
            {"id": "tok", "type": "idtoken", "conn_id": "t", "trust_domain": "aws", "purpose": "pilot"},
            {"id": "cern-app", "type": "openstack_app_credential", "conn_id": "c", "trust_domain": "cern",
             "purpose": "provision"},
            {"id": "cern-proxy", "type": "x509_proxy", "conn_id": "p", "trust_domain": "cern", "purpose": "pilot"},
        ],
    }
    cfg.update(over)
    return cfg


def test_each_entry_gets_credentials_of_its_own_trust_domain_and_the_vo_image_where_allowed():
    cfg = parse_config(config())
    choice = C.select(cfg, "cms")
    assert choice["east"] == {"provision": "aws-a", "pilot": "tok"}
    assert choice["west"] == {"provision": "aws-a", "pilot": "tok", "image": "ami-vo"}
    assert choice["cern"] == {"provision": "cern-app", "pilot": "cern-proxy"}
    assert C.ignored_vo_image(cfg, "cms") == ["east", "cern"]


def test_longest_remaining_lifetime_wins_and_too_short_ones_are_named():
    cfg = parse_config(config())
    validity = {"aws-a": Validity(True, remaining=50000.0), "aws-b": Validity(True, remaining=90000.0),
                "tok": Validity(True, remaining=3600.0)}
    choice = C.select(cfg, "cms", validity)
    # east's pilots live 12 h, west's 24 h (default): the 1 h token serves neither
    assert choice["east"]["skip"] == ("no usable pilot credential (tok: expires in 1.0 h, "
                                      "before the 12.0 h it must last)")
    assert choice["east"]["missing"] == ["pilot"]
    assert "before the 24.0 h it must last" in choice["west"]["skip"]
    assert choice["cern"] == {"provision": "cern-app", "pilot": "cern-proxy"}


def test_min_lifetime_overrides_the_pilot_lifetime_and_refusals_are_listed():
    data = config()
    data["credentials"][2]["min_lifetime"] = 600
    cfg = parse_config(data)
    validity = {"aws-a": Validity(True, remaining=3600.0), "aws-b": Validity(True, remaining=90000.0),
                "tok": Validity(True, remaining=3600.0)}
    choice = C.select(cfg, "cms", validity)
    assert choice["east"]["provision"] == "aws-b" and choice["east"]["pilot"] == "tok"
    assert choice["east"]["refused"] == {"aws-a": "expires in 1.0 h, before the 12.0 h it must last"}


def test_invalid_credential_is_skipped_and_the_other_serves():
    cfg = parse_config(config())
    validity = {"aws-a": Validity(False, "connection 'a' not found"), "cern-proxy": Validity(False, "expired 5 s ago")}
    choice = C.select(cfg, "cms", validity)
    assert choice["east"]["provision"] == "aws-b"
    assert choice["cern"] == {"skip": "no usable pilot credential (cern-proxy: expired 5 s ago)", "missing": ["pilot"]}


def test_wrong_trust_domain_never_serves():
    data = config()
    data["frontends"][0]["credentials"] = ["aws-a", "cern-proxy"]
    choice = C.select(parse_config(data), "cms")
    assert choice["east"]["skip"] == "no pilot credential of trust domain 'aws'"
    assert choice["cern"]["skip"] == ("no provision credential of trust domain 'cern' with auth method "
                                      "'app_credential'")


def test_ties_rotate_across_cycles_and_a_retry_keeps_its_choice():
    cfg = parse_config(config())
    picks, last = [], {}
    for cycle in ["run-1", "run-2", "run-2", "run-3"]:
        choice = C.select(cfg, "cms", {}, last, cycle)
        picks.append(choice["east"]["provision"])
        last = {(e, p): (cycle, c[p]) for e, c in choice.items() for p in ("provision", "pilot") if p in c}
    assert picks == ["aws-a", "aws-b", "aws-b", "aws-a"]
    # lifetimes within TIE_SECONDS are equal; a clearly longer one is not rotated away from
    near = {"aws-a": Validity(True, remaining=90000.0), "aws-b": Validity(True, remaining=90000.0 - C.TIE_SECONDS)}
    assert C.select(cfg, "cms", near, {("east", "provision"): ("x", "aws-a")}, "y")["east"]["provision"] == "aws-b"
    far = {"aws-a": Validity(True, remaining=90000.0), "aws-b": Validity(True, remaining=80000.0)}
    assert C.select(cfg, "cms", far, {("east", "provision"): ("x", "aws-a")}, "y")["east"]["provision"] == "aws-a"


def test_rotation_position_survives_in_the_state_store(tmp_path):
    from airflow_glidein.state import StateStore

    store = StateStore(f"sqlite:///{tmp_path}/state.db")
    assert C.load_rotation(store, "cms") == {}
    C.save_rotation(store, "cms", {"east": {"provision": "aws-a", "pilot": "tok"}}, "run-1")
    C.save_rotation(store, "cms", {"east": {"provision": "aws-b", "pilot": "tok"}}, "run-2")
    assert C.load_rotation(store, "cms") == {("east", "provision"): ("run-2", "aws-b"),
                                             ("east", "pilot"): ("run-2", "tok")}
    assert C.load_rotation(store, "atlas") == {}


def test_a_pilot_credential_must_be_able_to_join_a_pool():
    data = config()
    data["credentials"][0]["purpose"] = "pilot"
    with pytest.raises(ConfigError, match=r"credentials\[aws-a\]: a ec2_key_pair cannot join a pool"):
        parse_config(data)


def test_the_factory_refuses_a_request_with_a_credential_of_another_domain_and_keeps_entry_images():
    from airflow_glidein.provisioning import plan_launches

    cfg = parse_config(config())
    good = {"idle": 2, "max_running": 10, "provision": "aws-a", "pilot": "tok", "image": "ami-vo"}
    requests = {"cms": {"cycle": "c1", "entries": {
        "east": good,  # east does not allow VO images
        "west": good,
        "cern": {"idle": 2, "max_running": 10, "provision": "aws-a", "pilot": "cern-proxy"},  # an aws key at CERN
    }}}
    work = {w["entry"]: w for w in plan_launches(cfg, requests, [], "k")}
    assert [b["image"] for b in work["east"]["launches"]] == ["ami-1"]
    assert [b["image"] for b in work["west"]["launches"]] == ["ami-vo"]
    assert work["cern"]["launches"] == []
    assert work["cern"]["why"]["frontends"]["cms"]["refused"] == (
        "credential 'aws-a' is not a provision credential usable at trust domain 'cern'")
    stale = {"cms": {"entries": {"east": {"idle": 1, "max_running": 10, "provision": "gone", "pilot": "tok"}}}}
    assert plan_launches(cfg, stale, [], "k")[0]["why"]["frontends"]["cms"]["refused"] == (
        "provision credential 'gone' is not in the configuration")
