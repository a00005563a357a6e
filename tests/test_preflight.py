"""``python -m airflow_glidein preflight``: every cloud asked with its real client, each problem named."""

from __future__ import annotations

import http.server
import threading

import pytest

from airflow_glidein.cli import main
from tests.helpers import write_config, write_queue
from tests.standins.condor import Pool
from tests.test_e2e_multicloud import ENTRIES, multicloud_config

pytestmark = pytest.mark.usefixtures("airflow_db")


def results(out: str) -> dict[tuple[str, str], tuple[str, str]]:
    """{(scope, check): (result, detail)} from the printed table (columns split on 2+ spaces)."""
    import re

    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split() == ["scope", "check", "result", "detail"])
    rows = {}
    for line in lines[start + 2:]:
        if re.fullmatch(r"\d+ checks, \d+ failed", line):
            break
        cells = re.split(r"\s{2,}", line.strip(), maxsplit=3)
        rows[(cells[0], cells[1])] = (cells[2], cells[3] if len(cells) > 3 else "")
    return rows


@pytest.fixture
def config(ec2, nova, one, bootstrap_server, tmp_path, monkeypatch):
    pool = Pool().install(monkeypatch)
    cfg = multicloud_config(write_queue(tmp_path, []))
    cfg["factory"].update(bootstrap_url=f"{bootstrap_server.url}/glidein", collector=pool.address)
    good = {e["name"]: e for e in cfg["entries"]}
    cfg["entries"] += [
        {**good["aws-us-east-1"], "name": "aws-bad-ami", "image": "ami-00000000", "flavor": "c9.huge"},
        {**good["aws-us-east-1"], "name": "aws-small", "flavor": "t3.micro"},  # 2 vCPUs, 1 GiB for a 4-core entry
        {**good["cern-openstack"], "name": "cern-bad-flavor", "flavor": "m1.missing"},
        {**good["fermicloud"], "name": "fnal-bad-template", "flavor": "no-such-template"},
        {**good["aws-us-east-1"], "name": "aws-other", "trust_domain": "aws2"},
        {**good["aws-us-east-1"], "name": "aws-nocred", "trust_domain": "aws3"},
    ]
    cfg["credentials"].append({"id": "aws-atlas", "type": "ec2_key_pair", "conn_id": "glidein_aws_atlas",
                               "trust_domain": "aws2", "purpose": "provision"})
    yield write_config(tmp_path, cfg, monkeypatch)
    pool.close()


def test_preflight_asks_each_cloud_and_names_each_problem(config, nova, one, capsys):
    assert main(["preflight", str(config)]) == 1
    out = capsys.readouterr().out
    r = results(out)
    # the good entries, each through its real client
    assert r[("entry aws-us-east-1", "provider answers via aws-cms")][0] == "ok"
    assert r[("entry aws-us-east-1", "image ami-1e749f67 via aws-cms")] == ("ok", "state available")
    assert r[("entry aws-us-east-1", "instance type c5.xlarge via aws-cms")] == ("ok", "4 cores, 8192 MB")
    assert r[("entry cern-openstack", "provider answers via cern-cms")][0] == "ok"
    assert r[("entry cern-openstack", "flavor m1.pilot via cern-cms")] == ("ok", "4 cores, 8192 MB")
    assert r[("entry fermicloud", "template 4 via fnal-cms")][0] == "ok"
    assert r[("entry cern-openstack", "quota headroom via cern-cms")] == (
        "ok", "instances 100000 left: room for 100000 pilots")
    assert r[("entry aws-us-east-1", "quota headroom via aws-cms")] == ("ok", "the provider does not say")
    assert r[("entry fermicloud", "quota headroom via fnal-cms")] == ("ok", "no limit set")
    assert r[("factory", f"collector {Pool().address}")][0] == "ok"
    assert r[("credential pool-aws", "connection readable, credential valid")][0] == "ok"
    ok, detail = r[("factory", next(k[1] for k in r if k[1].startswith("bootstrap service")))]
    assert ok == "ok" and detail.startswith("answers, same signing key and state store (key id ")
    # each problem, named
    assert r[("entry aws-bad-ami", "image ami-00000000 via aws-cms")][0] == "FAILED"
    assert "InvalidAMIID.NotFound" in r[("entry aws-bad-ami", "image ami-00000000 via aws-cms")][1]
    assert "InvalidInstanceType" in r[("entry aws-bad-ami", "instance type c9.huge via aws-cms")][1]
    assert r[("entry aws-small", "instance type t3.micro via aws-cms")] == (
        "FAILED", "2 cores, 1024 MB: less than the entry's 4 cores, 8192 MB that planning counts")
    assert r[("entry cern-bad-flavor", "flavor m1.missing via cern-cms")][0] == "FAILED"
    assert r[("entry fnal-bad-template", "template no-such-template via fnal-cms")] == (
        "FAILED", "ValueError: Entry fnal-bad-template: 0 OpenNebula templates named 'no-such-template' (need one)")
    assert r[("credential aws-atlas", "connection readable, credential valid")] == (
        "FAILED", "connection 'glidein_aws_atlas' not found")
    assert r[("entry aws-other", "provider via aws-atlas")] == (
        "FAILED", "credential unusable: connection 'glidein_aws_atlas' not found")
    assert r[("entry aws-nocred", "provision credential")] == (
        "FAILED", "no provision credential of trust domain 'aws3' with auth 'key_pair'")
    failed = [k for k, v in r.items() if v[0] == "FAILED"]
    assert len(failed) == 8 and out.rstrip().endswith(f"{len(r)} checks, 8 failed")
    for secret in ("app-cred-secret", "one-secret", nova.app_credentials["app-cred-id"]):
        assert secret not in out


def test_preflight_of_good_entries_passes(config, capsys):
    argv = ["preflight", str(config)] + [a for e in ENTRIES for a in ("--entry", e)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "FAILED" not in out and out.rstrip().endswith(" checks, 0 failed")
    assert "aws-atlas" not in out  # only the chosen entries' trust domains


class _OtherKey(http.server.BaseHTTPRequestHandler):
    """A stand-in for a bootstrap service run with another state store: it signs with another key."""

    def do_GET(self):  # noqa: N802
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        body = Ed25519PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_bootstrap_service_that_does_not_share_the_state_store_is_named(tmp_path, monkeypatch, capsys):
    from airflow_glidein import preflight

    httpd = http.server.HTTPServer(("127.0.0.1", 0), _OtherKey)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        check = preflight._bootstrap(f"http://127.0.0.1:{httpd.server_port}/glidein")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert not check.ok and "does not share the factory's state store (GLIDEIN_STATE_URL)" in check.detail
    check = preflight._bootstrap(f"http://127.0.0.1:{httpd.server_port}/glidein")  # now closed
    assert not check.ok and check.detail.startswith("not reachable from here: URLError")
