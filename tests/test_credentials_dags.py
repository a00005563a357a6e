"""Two frontends, three entries in two trust domains, credentials in Airflow connections: whole frontend DAG runs."""

from __future__ import annotations

import re
import time

import pytest

from airflow_glidein import secrets
from airflow_glidein.config import parse_config
from tests import pki
from tests.helpers import idle_jobs, jwt_token, run_dag, task_states, write_config, write_queue, xcom

pytestmark = pytest.mark.usefixtures("airflow_db")


def scenario(queue: str) -> dict:
    def cred(cid, kind, domain, purpose):
        return {"id": cid, "type": kind, "conn_id": cid.replace("-", "_"), "trust_domain": domain, "purpose": purpose}

    demand = {"queue_file": queue}
    match = "stringListMember(glidein.GLIDEIN_Site, job.DESIRED_Sites)"
    return {
        "factory": {"name": "f", "bootstrap_url": "http://127.0.0.1:8080/glidein", "retry_delay": 0, "retries": 0},
        "entries": [
            {"name": "aws-east", "middleware": "ec2", "region": "us-east-1", "image": "ami-east", "flavor": "c5.large",
             "attrs": {"GLIDEIN_Site": "AWS_EAST"}, "trust_domain": "aws", "auth_method": "key_pair",
             "policy": {"max_lifetime": 43200}},
            {"name": "aws-west", "middleware": "ec2", "region": "us-west-2", "image": "ami-west", "flavor": "c5.large",
             "attrs": {"GLIDEIN_Site": "AWS_WEST"}, "trust_domain": "aws", "auth_method": "key_pair+vm_id+vm_type",
             "allow_vo_image": True, "policy": {"max_lifetime": 43200}},
            {"name": "cern-cloud", "middleware": "openstack", "endpoint": "cern-nova", "image": "cc7-glidein",
             "flavor": "m2.large", "attrs": {"GLIDEIN_Site": "CERN"}, "trust_domain": "cern",
             "auth_method": "app_credential", "policy": {"max_lifetime": 43200}},
        ],
        "frontends": [
            {"name": "cms", "demand": demand, "match_expr": match, "vo_image": "ami-cms-vo",
             "entries": ["aws-east", "aws-west", "cern-cloud"],
             "credentials": ["cms-aws", "cms-token", "cms-cern-app", "cms-cern-proxy"]},
            {"name": "atlas", "demand": demand, "match_expr": match,
             "entries": ["aws-east", "aws-west", "cern-cloud"],
             "credentials": ["atlas-aws", "atlas-aws-2", "atlas-proxy-short", "atlas-proxy-broken", "atlas-token",
                             "atlas-cern-app", "atlas-cern-proxy"]},
        ],
        "credentials": [
            cred("cms-aws", "ec2_key_pair", "aws", "provision"),
            cred("cms-token", "idtoken", "aws", "pilot"),
            cred("cms-cern-app", "openstack_app_credential", "cern", "provision"),
            cred("cms-cern-proxy", "x509_proxy", "cern", "pilot"),
            cred("atlas-aws", "ec2_key_pair", "aws", "provision"),
            cred("atlas-aws-2", "ec2_key_pair", "aws", "provision"),
            cred("atlas-proxy-short", "x509_proxy", "aws", "pilot"),  # 2 h left, pilots live 12 h
            cred("atlas-proxy-broken", "x509_proxy", "aws", "pilot"),  # malformed PEM
            cred("atlas-token", "scitoken", "aws", "pilot"),  # no exp
            cred("atlas-cern-app", "openstack_app_credential", "cern", "provision"),  # no connection
            cred("atlas-cern-proxy", "x509_proxy", "cern", "pilot"),  # expired
        ],
    }


@pytest.fixture
def connections(monkeypatch, tmp_path):
    ca = pki.CA()
    values = {
        "cms_aws": pki.conn("aws", login="AKIACMSEXAMPLE", password="cms-aws-secret-key-0001"),
        "cms_token": pki.conn("glidein_token", password=jwt_token(
            {"iss": "cm.cms.example.org", "sub": "pilot", "exp": pki.hours(72)}, signature="cms-token-signature-0001")),
        "cms_cern_app": pki.conn("glidein_openstack", host="https://keystone.cern.example:5000/v3",
                                 login="cms-appcred-id", password="cms-appcred-secret-0001"),
        "cms_cern_proxy": pki.conn("glidein_x509", extra={"proxy": ca.proxy("CMS Pilot", hours=96)}),
        "atlas_aws": pki.conn("aws", login="AKIAATLASEXAMPLE", password="atlas-aws-secret-key-0001"),
        "atlas_aws_2": pki.conn("aws", login="AKIAATLASEXAMPLE2", password="atlas-aws-secret-key-0002"),
        "atlas_proxy_short": pki.conn("glidein_x509", extra={"proxy": ca.proxy("ATLAS Short", hours=2)}),
        "atlas_proxy_broken": pki.conn("glidein_x509", extra={"proxy": ca.proxy("ATLAS Broken")[:150]}),
        "atlas_token": pki.conn("glidein_token", password=jwt_token({"iss": "https://atlas-auth.example", "aud": "any"})),
        "atlas_cern_proxy": pki.conn("glidein_x509", extra={"proxy": ca.proxy("ATLAS Old", hours=-3)}),
    }
    for conn_id, value in values.items():
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", value)
    return values


def test_each_frontend_and_entry_gets_a_credential_of_its_trust_domain(connections, tmp_path, monkeypatch, capfd):
    queue = write_queue(tmp_path, idle_jobs(8, "AWS_EAST,AWS_WEST,CERN"))
    data = scenario(queue)
    write_config(tmp_path, data, monkeypatch)
    cfg = parse_config(data)

    plans = {}
    for fe in ("cms", "atlas"):
        run = run_dag(f"glidein_frontend_{fe}")
        assert str(run.state) == "success", task_states(run)
        plans[fe] = xcom(run, "plan_pilots")
    logs = capfd.readouterr().out

    cms, atlas = plans["cms"]["entries"], plans["atlas"]["entries"]
    assert {e: (p["provision"], p["pilot"]) for e, p in cms.items()} == {
        "aws-east": ("cms-aws", "cms-token"),
        "aws-west": ("cms-aws", "cms-token"),
        "cern-cloud": ("cms-cern-app", "cms-cern-proxy"),
    }
    assert plans["cms"]["skipped"] == {}
    # the VO image only where the entry allows it
    assert cms["aws-west"]["image"] == "ami-cms-vo" and "image" not in cms["aws-east"]
    assert "image" not in cms["cern-cloud"]
    assert "entry aws-east does not allow a VO image; it keeps its own image ami-east, not ami-cms-vo" in logs

    # atlas: the short-lived and the broken proxy are passed over for the token without exp;
    # at CERN its app credential has no connection and its proxy expired: the entry is skipped, with why
    assert {e: (p["provision"], p["pilot"]) for e, p in atlas.items()} == {
        "aws-east": ("atlas-aws", "atlas-token"),
        "aws-west": ("atlas-aws", "atlas-token"),
    }
    reason = plans["atlas"]["skipped"]["cern-cloud"]
    assert reason.startswith("no usable provision credential (atlas-cern-app: connection 'atlas_cern_app' not found)")
    # pki's certificates are dated from the session's start: an hour or so of a slow suite adds to "3.0 h"
    assert re.search(r"no usable pilot credential \(atlas-cern-proxy: expired [34]\.\d h ago", reason), reason
    assert atlas_plan_levels(plans["atlas"]) == {"aws-east", "aws-west"}

    # never a credential of another trust domain, and each frontend only its own
    for fe, plan in plans.items():
        for entry, p in plan["entries"].items():
            for purpose in ("provision", "pilot"):
                cred = cfg.credential(p[purpose])
                assert cred.trust_domain == cfg.entry(entry).trust_domain
                assert cred.id in cfg.frontend(fe).credentials

    # each bad credential is named in a warning with its reason
    assert "Credential atlas-proxy-broken (x509_proxy, connection atlas_proxy_broken) is skipped this cycle: " \
           "malformed PEM: no readable certificate" in logs
    assert "Credential atlas-cern-app (openstack_app_credential, connection atlas_cern_app) is skipped this cycle: " \
           "connection 'atlas_cern_app' not found" in logs
    # the 2 h proxy was dated at the session's start: a slow suite has used some of it
    assert re.search(r"Entry aws-east: credential atlas-proxy-short passed over: expires in [12]\.\d h, before the "
                     r"12\.0 h it must last", logs), logs
    assert "credential atlas-proxy-broken passed over" not in logs  # named once, above
    assert "Frontend atlas leaves entry cern-cloud out of this cycle" in logs
    assert "Credential cms-cern-proxy (x509_proxy, trust domain cern, pilot): 4.0 d left; subject=CN=" in logs


def atlas_plan_levels(plan: dict) -> set[str]:
    return {e for e, p in plan["entries"].items() if p["idle"] > 0}


def test_equal_credentials_rotate_from_one_cycle_to_the_next(connections, tmp_path, monkeypatch):
    data = scenario(write_queue(tmp_path, idle_jobs(4, "AWS_EAST")))
    write_config(tmp_path, data, monkeypatch)
    picks = []
    for _ in range(3):
        run = run_dag("glidein_frontend_atlas")
        assert str(run.state) == "success", task_states(run)
        picks.append(xcom(run, "select_credentials")["aws-east"]["provision"])
    assert picks == ["atlas-aws", "atlas-aws-2", "atlas-aws"]


def test_check_reads_every_kind_from_its_connection(connections):
    cfg = parse_config(scenario("q.json"))
    validity = secrets.check(cfg, [c.id for c in cfg.credentials], time.time())
    assert {cid for cid, v in validity.items() if v.ok} == {
        "cms-aws", "cms-token", "cms-cern-app", "cms-cern-proxy", "atlas-aws", "atlas-aws-2", "atlas-proxy-short",
        "atlas-token"}
    assert validity["atlas-proxy-short"].remaining < 2 * 3600
    assert validity["atlas-token"].remaining is None and validity["atlas-token"].info["iss"] == "https://atlas-auth.example"
    assert validity["cms-cern-app"].info == {"auth_url": "https://keystone.cern.example:5000/v3",
                                             "auth_type": "application_credential", "login": "cms-appcred-id"}


def test_pilot_payload_refuses_a_provisioning_credential(connections):
    cfg = parse_config(scenario("q.json"))
    assert secrets.pilot_payload(cfg, "cms-token").endswith(".cms-token-signature-0001")
    with pytest.raises(ValueError, match="'cms-aws' is a provision credential"):
        secrets.pilot_payload(cfg, "cms-aws")


def test_connection_types_are_valid_provider_info_and_resolve_to_their_hooks(airflow_db):
    import json
    from importlib.resources import files

    import jsonschema
    from airflow.providers_manager import ProvidersManager

    from airflow_glidein.get_provider_info import get_provider_info

    info = get_provider_info()
    jsonschema.validate(info, json.loads(files("airflow").joinpath("provider_info.schema.json").read_text()))
    hooks = ProvidersManager().hooks
    for conn_type in ("glidein_x509", "glidein_token", "glidein_ssh", "glidein_openstack", "glidein_opennebula"):
        assert hooks[conn_type].hook_class_name.startswith("airflow_glidein.secrets.")
        assert hooks[conn_type].connection_id_attribute_name == "glidein_credential_conn_id"


@pytest.mark.parametrize("conn_id, ok, message", [
    ("cms_cern_proxy", True, "x509_proxy: 4.0 d left; subject=CN="),
    ("cms_token", True, "idtoken: 3.0 d left; iss=cm.cms.example.org"),
    ("atlas_proxy_broken", False, "x509_proxy: malformed PEM: no readable certificate"),
    ("atlas_cern_proxy", False, re.compile(r"x509_proxy: expired [34]\.\d h ago")),
    ("cms_cern_app", True, "openstack_app_credential: does not expire; auth_url=https://keystone.cern.example:5000/v3"),
])
def test_the_ui_test_button_reads_and_checks_the_material(connections, conn_id, ok, message):
    from airflow.sdk import BaseHook

    hook = BaseHook.get_connection(conn_id).get_hook()
    assert isinstance(hook, secrets.CredentialHook)
    result = hook.test_connection()
    assert result[0] is ok and (message.match(result[1]) if isinstance(message, re.Pattern)
                                else result[1].startswith(message)), result


def test_openstack_hook_gives_the_sdk_arguments(connections):
    hook = secrets.OpenStackCredentialHook("cms_cern_app")
    assert hook.connect_args() == {"auth_type": "v3applicationcredential", "auth": {
        "auth_url": "https://keystone.cern.example:5000/v3", "application_credential_id": "cms-appcred-id",
        "application_credential_secret": "cms-appcred-secret-0001"}}
