"""No secret anywhere: a frontend and a factory run with known secret strings, then every output is searched.

Searched: the task logs (dag.test writes them to stdout; also any file under
AIRFLOW_HOME/logs), the whole metadata database file (XCom values, rendered
template fields, asset events with the published request, the audit log),
the state store, and in moto every instance's tags and UserData (raw and the
decoded envelope). Each search has a positive control, so zero hits means
something.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from airflow_glidein.userdata import parse as parse_userdata
from tests import pki
from tests.helpers import idle_jobs, jwt_token, run_dag, task_states, write_config, write_queue, xcom

pytestmark = pytest.mark.usefixtures("airflow_db")

AWS_SECRET = "S3CR3T-aws-secret-access-key-7c1d9a"
TOKEN_SIG = "S3CR3T-pool-idtoken-signature-5b2e"
SCITOKEN_SIG = "S3CR3T-scitoken-signature-e41f"
OS_SECRET = "S3CR3T-openstack-appcred-secret-91ab"
BROKEN_JSON_SECRET = "S3CR3T-in-a-broken-connection-0d3c"
MALFORMED_PEM_SECRET = "S3CR3TmalformedProxyBody0123456789abcdef"


def config(queue: str, with_openstack: bool) -> dict:
    def cred(cid, kind, purpose, domain="aws"):
        return {"id": cid, "type": kind, "conn_id": cid.replace("-", "_"), "trust_domain": domain, "purpose": purpose}

    entries = [
        {"name": "aws-east", "middleware": "ec2", "region": "us-east-1", "image": "ami-east", "flavor": "c5.large",
         "attrs": {"GLIDEIN_Site": "EAST"}, "trust_domain": "aws", "auth_method": "key_pair",
         "limits": {"max_idle": 3, "batch_size": 3}},
        {"name": "aws-west", "middleware": "ec2", "region": "us-west-2", "image": "ami-west", "flavor": "c5.large",
         "attrs": {"GLIDEIN_Site": "WEST"}, "trust_domain": "aws", "auth_method": "key_pair+vm_id+vm_type",
         "allow_vo_image": True, "limits": {"max_idle": 2, "batch_size": 2}},
    ]
    creds = [cred("sec-aws", "ec2_key_pair", "provision"), cred("sec-token", "idtoken", "pilot"),
             cred("sec-scitoken", "scitoken", "pilot"), cred("sec-proxy", "x509_proxy", "pilot"),
             cred("sec-ssh", "ssh_key", "provision"), cred("sec-broken", "idtoken", "pilot"),
             cred("sec-malformed", "x509_proxy", "pilot")]
    if with_openstack:
        entries.append({"name": "cern-cloud", "middleware": "openstack", "image": "cc7", "flavor": "m2.large",
                        "attrs": {"GLIDEIN_Site": "CERN"}, "trust_domain": "cern", "auth_method": "app_credential"})
        creds += [cred("sec-os", "openstack_app_credential", "provision", "cern"),
                  cred("sec-cern-proxy", "x509_proxy", "pilot", "cern")]
    return {
        "factory": {"name": "secrecy-factory", "bootstrap_url": "http://127.0.0.1:8080/glidein", "retry_delay": 0},
        "entries": entries,
        "frontends": [{"name": "vo", "demand": {"queue_file": queue}, "vo_image": "ami-vo-image",
                       "match_expr": "stringListMember(glidein.GLIDEIN_Site, job.DESIRED_Sites)",
                       "entries": [e["name"] for e in entries], "credentials": [c["id"] for c in creds]}],
        "credentials": creds,
    }


@pytest.fixture
def secrets_in_connections(ec2, monkeypatch, tmp_path) -> list[str]:
    ca = pki.CA()
    proxy, cern_proxy, ssh = ca.proxy("Secret Pilot", hours=72), ca.proxy("CERN Pilot", hours=72), pki.ssh_private_key()
    malformed = f"-----BEGIN CERTIFICATE-----\n{MALFORMED_PEM_SECRET}\n-----END CERTIFICATE-----\n"
    conns = {
        "sec_aws": pki.conn("aws", login="AKIASECRECYTEST01", password=AWS_SECRET,
                            extra={"endpoint_url": ec2.url, "region_name": "us-east-1"}),
        "sec_token": pki.conn("glidein_token", password=jwt_token({"iss": "cm.example.org", "sub": "pilot"}, TOKEN_SIG)),
        "sec_scitoken": pki.conn("glidein_token", extra={"token": jwt_token(
            {"iss": "https://vo-auth.example", "aud": "cm.example.org", "exp": pki.hours(72)}, SCITOKEN_SIG)}),
        "sec_proxy": pki.conn("glidein_x509", extra={"proxy": proxy}),
        "sec_ssh": pki.conn("glidein_ssh", login="vo-key", extra={"private_key": ssh}),
        "sec_broken": '{"conn_type": "glidein_token", "password": "' + BROKEN_JSON_SECRET,  # not JSON
        "sec_malformed": pki.conn("glidein_x509", extra={"proxy": malformed}),
        "sec_os": pki.conn("glidein_openstack", host="https://keystone.invalid:5000/v3", login="appcred-id-1",
                           password=OS_SECRET),
        "sec_cern_proxy": pki.conn("glidein_x509", extra={"proxy": cern_proxy}),
    }
    for conn_id, value in conns.items():
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", value)
    secrets = [AWS_SECRET, TOKEN_SIG, SCITOKEN_SIG, OS_SECRET, BROKEN_JSON_SECRET, MALFORMED_PEM_SECRET]
    for pem in (proxy, cern_proxy, ssh):  # every line of every private key
        key = pem[pem.index("-----BEGIN"):] if "OPENSSH" in pem else pki.private_key_pem(pem)
        secrets += [line for line in key.splitlines() if line and not line.startswith("-----")]
    return secrets


def hits(text: str, secrets: list[str]) -> list[str]:
    return [s[:12] + "..." for s in secrets if s in text]


def sqlite_text(path: Path) -> str:
    """A SQLite database's bytes with its write-ahead log (recent writes live there)."""
    files = [path, path.with_name(path.name + "-wal")]
    return "".join(f.read_bytes().decode("latin-1") for f in files if f.exists())


def log_files_text() -> str:
    logs = Path(os.environ["AIRFLOW_HOME"]) / "logs"
    return "".join(p.read_text(errors="replace") for p in logs.rglob("*") if p.is_file())


def test_no_secret_in_logs_xcom_rendered_fields_plan_tags_or_userdata(
    secrets_in_connections, ec2, tmp_path, monkeypatch, capfd
):
    secrets = secrets_in_connections
    queue = write_queue(tmp_path, idle_jobs(6, "EAST,WEST,CERN"))
    write_config(tmp_path, config(queue, with_openstack=True), monkeypatch)
    fe = run_dag("glidein_frontend_vo")
    assert str(fe.state) == "success", task_states(fe)
    request = xcom(fe, "plan_pilots")
    # the factory runs on the EC2 entries only (the OpenStack hook is not part of this test)
    write_config(tmp_path, config(queue, with_openstack=False), monkeypatch)
    fa = run_dag("glidein_factory")
    assert str(fa.state) == "success", task_states(fa)
    captured = capfd.readouterr()
    logs = captured.out + captured.err + log_files_text()

    # positive controls: the material was read, the plan was made, pilots were launched
    assert "Credential sec-proxy (x509_proxy, trust domain aws, pilot): 3.0 d left; subject=CN=" in logs
    assert "Credential sec-malformed (x509_proxy, connection sec_malformed) is skipped this cycle: " \
           "malformed PEM: no readable certificate" in logs
    assert "Credential sec-broken (idtoken, connection sec_broken) is skipped this cycle: " \
           "connection 'sec_broken' not found" in logs
    assert request["entries"]["aws-east"]["pilot"] == "sec-token"  # no exp: outlives the scitoken
    assert request["entries"]["aws-west"]["image"] == "ami-vo-image"
    assert request["entries"]["cern-cloud"] == {**request["entries"]["cern-cloud"], "provision": "sec-os",
                                                "pilot": "sec-cern-proxy"}
    instances = ec2.instances("us-east-1") + ec2.instances("us-west-2")
    assert len(instances) == request["entries"]["aws-east"]["idle"] + request["entries"]["aws-west"]["idle"] == 4
    assert {i["ImageId"] for i in ec2.instances("us-west-2")} == {"ami-vo-image"}

    # the searches
    assert hits(logs, secrets) == []
    db = sqlite_text(Path(os.environ["AIRFLOW_HOME"]) / "airflow.db")
    assert fe.run_id in db and '"provision"' in db  # XCom and the published request are in this file
    assert hits(db, secrets) == []
    state_db = sqlite_text(Path(os.environ["GLIDEIN_STATE_URL"].removeprefix("sqlite:///")))  # conftest: one per test
    assert "glidein_credential_rotation" in state_db and "sec-aws" in state_db
    assert hits(state_db, secrets) == []
    for inst in instances:
        tags = json.dumps(inst["TagMap"])
        attr = ec2.client(inst["Placement"]["AvailabilityZone"][:-1]).describe_instance_attribute(
            InstanceId=inst["InstanceId"], Attribute="userData")
        raw = base64.b64decode(attr["UserData"]["Value"]).decode()
        envelope = json.dumps(parse_userdata(raw))
        assert envelope and "sec-token" not in envelope  # the pilot credential is not even named there
        assert hits(tags + raw + envelope, secrets) == []


def test_rendered_fields_and_xcom_hold_ids_only(secrets_in_connections, tmp_path, monkeypatch):
    from airflow.models.renderedtifields import RenderedTaskInstanceFields as RTIF
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    write_config(tmp_path, config(write_queue(tmp_path, idle_jobs(2, "EAST")), with_openstack=True), monkeypatch)
    fe = run_dag("glidein_frontend_vo")
    with create_session() as session:
        rendered = session.scalars(select(RTIF).where(RTIF.run_id == fe.run_id)).all()
        xcoms = session.scalars(select(XComModel).where(XComModel.run_id == fe.run_id)).all()
    assert {r.task_id for r in rendered} == {"query_demand", "select_credentials", "plan_pilots", "publish_request"}
    assert len(xcoms) >= 4
    text = json.dumps([r.rendered_fields for r in rendered], default=str) + json.dumps(
        [XComModel.deserialize_value(x) for x in xcoms], default=str)
    assert "sec-token" in text and "sec-aws" in text  # ids are there...
    assert hits(text, secrets_in_connections) == []  # ...secrets are not


def test_secrets_read_are_masked_by_the_task_log_pipeline(secrets_in_connections, tmp_path, monkeypatch):
    """What Airflow's supervisor writes to task log files goes through the masker our reads register with.

    (dag.test prints logs through the test process's own structlog set-up, which does not mask;
    the test above therefore shows that nothing logs a secret in the first place.)
    """
    import io

    import structlog
    from airflow.sdk.log import logging_processors

    from airflow_glidein import secrets
    from airflow_glidein.config import parse_config

    cfg = parse_config(config("q.json", with_openstack=True))
    validity = secrets.check(cfg, [c.id for c in cfg.credentials])
    assert sum(v.ok for v in validity.values()) == 7
    keys = [pki.private_key_pem(json.loads(os.environ[f"AIRFLOW_CONN_{c}"])["extra"]["proxy"])
            for c in ("SEC_PROXY", "SEC_CERN_PROXY")]
    keys.append(json.loads(os.environ["AIRFLOW_CONN_SEC_SSH"])["extra"]["private_key"].strip())
    buf = io.BytesIO()
    log = structlog.wrap_logger(structlog.BytesLogger(buf), processors=logging_processors(json_output=True)).bind()
    readable = [AWS_SECRET, TOKEN_SIG, SCITOKEN_SIG, OS_SECRET] + keys
    for s in readable:
        log.warning("careless %s", s)
        log.warning("careless", detail={"value": f"prefix {s} suffix"})
    out = buf.getvalue().decode()
    assert out.count("***") == 2 * len(readable)
    assert hits(out, readable) == []
