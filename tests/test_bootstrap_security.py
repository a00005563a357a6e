"""Security of the pilot side, against the real bootstrap service (in Airflow's API server) and moto.

Tokens: reused, expired, forged and other-pilot tokens are refused; a batch
token binds each instance once. Wrapper: a bad signature or a startup script
with the wrong hash stops it with a clear message. Logs: names with '..' or
'/' are refused, an oversize upload is cut off and refused. UserData holds no
secret, and the state store holds only token hashes.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import re
import secrets
import time

import httpx
import pytest
from sqlalchemy import select

from airflow_glidein import userdata as U
from airflow_glidein.bootstrap import keys
from airflow_glidein.bootstrap.tokens import tokens as tokens_table
from airflow_glidein.state import store
from tests.helpers import POOL_TOKEN
from tests.pilot_helpers import VM, launch, pilot_config, userdata_of

pytestmark = pytest.mark.usefixtures("airflow_db")


@pytest.fixture
def cfg(ec2, bootstrap_server, tmp_path, monkeypatch):
    return pilot_config(tmp_path, monkeypatch, bootstrap_server)


def token_of(text: str) -> str:
    return U.parse(text)["token"]


def exchange(server, token: str, iid: str) -> httpx.Response:
    return httpx.post(f"{server.url}/glidein/bootstrap/exchange", params={"instance_id": iid},
                      headers={"Authorization": f"Bearer {token}"})


def upload(server, token: str, name: str, data, iid: str | None = None, **kw) -> httpx.Response:
    params = {"instance_id": iid} if iid else {}
    return httpx.put(f"{server.url}/glidein/bootstrap/logs/{name}", params=params, content=data,
                     headers={"Authorization": f"Bearer {token}", **kw.pop("headers", {})}, **kw)


def test_batch_token_binds_each_instance_once(cfg, bootstrap_server):
    iids, text = launch(cfg, count=2)
    tok = token_of(text)
    first = exchange(bootstrap_server, tok, iids[0])
    assert first.status_code == 200, first.text
    assert f"pilot_id={iids[0]}\n" in first.text and "upload_token=" in first.text
    # the pilot credential comes from the credential's Airflow connection
    assert f"credential_b64={base64.b64encode(POOL_TOKEN.encode()).decode()}\n" in first.text
    reused = exchange(bootstrap_server, tok, iids[0])
    assert reused.status_code == 403 and "already exchanged" in reused.text
    stranger = exchange(bootstrap_server, tok, "i-0123456789abcdef0")
    assert stranger.status_code == 403 and "is not an instance of launch" in stranger.text
    second = exchange(bootstrap_server, tok, iids[1])
    assert second.status_code == 200
    assert exchange(bootstrap_server, tok, "i-0123456789abcdef0").text.startswith("error=all 2 exchanges")


def test_expired_forged_and_missing_tokens_are_refused(cfg, bootstrap_server):
    (iid,), text = launch(cfg, now=time.time() - 1000)  # the entry's boot timeout is 900 s
    expired = exchange(bootstrap_server, token_of(text), iid)
    assert expired.status_code == 403 and re.search(r"expired \d+ s ago", expired.text), expired.text
    forged = exchange(bootstrap_server, secrets.token_urlsafe(32), iid)
    assert forged.status_code == 403 and "unknown bootstrap token" in forged.text
    bare = httpx.post(f"{bootstrap_server.url}/glidein/bootstrap/exchange", params={"instance_id": iid})
    assert bare.status_code == 401


def test_another_pilots_token_is_refused(cfg, bootstrap_server):
    (a,), text_a = launch(cfg)
    (b,), text_b = launch(cfg)
    other = exchange(bootstrap_server, token_of(text_a), b)
    assert other.status_code == 403 and "is not an instance of launch" in other.text
    ok = exchange(bootstrap_server, token_of(text_b), b)
    up_b = dict(line.split("=", 1) for line in ok.text.splitlines())["upload_token"]
    # an upload token writes for its own pilot only, whatever instance the request names
    assert upload(bootstrap_server, up_b, "notes.log", b"from b", iid=a).status_code == 200
    assert bootstrap_server.logs("aws-us-east-1", b) == {"notes.log": "from b"}
    assert bootstrap_server.logs("aws-us-east-1", a) == {}
    # a bootstrap token may upload for an instance of its own launch only (a wrapper that failed early)
    assert upload(bootstrap_server, token_of(text_a), "early.log", b"x", iid=b).status_code == 403
    assert upload(bootstrap_server, token_of(text_a), "early.log", b"x", iid=a).status_code == 200
    assert upload(bootstrap_server, secrets.token_urlsafe(32), "early.log", b"x", iid=a).status_code == 403


@pytest.mark.parametrize("name", ["..", "..%2F..%2Fetc%2Fpasswd", "a%2Fb", "sub/dir.log", "x..y", "%2E%2E"])
def test_log_names_with_dots_or_slashes_are_refused(cfg, bootstrap_server, name):
    (iid,), text = launch(cfg)
    # http.client sends the path as written (httpx would resolve the dots itself)
    conn = http.client.HTTPConnection("127.0.0.1", bootstrap_server.port, timeout=30)
    conn.request("PUT", f"/glidein/bootstrap/logs/{name}?instance_id={iid}", body=b"data",
                 headers={"Authorization": f"Bearer {token_of(text)}"})
    r = conn.getresponse()
    body = r.read().decode()
    assert r.status == 400 and "may not contain '/'" in body, (r.status, body)
    assert bootstrap_server.logs("aws-us-east-1", iid) == {}


def test_oversize_upload_is_cut_off_and_refused(cfg, bootstrap_server, monkeypatch):
    monkeypatch.setenv("AIRFLOW__GLIDEIN__PILOT_LOG_MAX_FILE_BYTES", "1000")
    monkeypatch.setenv("AIRFLOW__GLIDEIN__PILOT_LOG_MAX_PILOT_BYTES", "1500")
    (iid,), text = launch(cfg)
    tok = token_of(text)
    sent = []

    def chunks():  # chunked transfer encoding: no Content-Length to refuse up front
        for _ in range(100):
            sent.append(1)
            yield b"y" * 500

    r = upload(bootstrap_server, tok, "big.log", chunks(), iid=iid)
    assert r.status_code == 413 and "cut off and refused at 1000 bytes" in r.text
    declared = upload(bootstrap_server, tok, "big.log", b"z" * 5000, iid=iid)
    assert declared.status_code == 413 and "5000 bytes refused" in declared.text
    assert bootstrap_server.logs("aws-us-east-1", iid) == {}
    assert upload(bootstrap_server, tok, "a.log", b"a" * 900, iid=iid).status_code == 200
    quota = upload(bootstrap_server, tok, "b.log", b"b" * 900, iid=iid)
    assert quota.status_code == 413 and "remaining log quota of 600 bytes" in quota.text
    assert set(bootstrap_server.logs("aws-us-east-1", iid)) == {"a.log"}


def test_no_secret_in_userdata_and_only_hashes_in_the_store(cfg, ec2, bootstrap_server):
    (iid,), text = launch(cfg)
    raw = userdata_of(ec2, iid).decode()
    assert raw == text
    signing = U.private_pem(keys.signing_key(store()))
    for secret in ("pool-token-value", "testing-secret-key", signing.splitlines()[1]):
        assert secret not in raw and secret not in U.parse(raw).values()
    ok = exchange(bootstrap_server, token_of(text), iid)
    upload_token = dict(line.split("=", 1) for line in ok.text.splitlines())["upload_token"]
    with store().begin() as conn:
        stored = {row.token_hash for row in conn.execute(select(tokens_table))}
    assert hashlib.sha256(token_of(text).encode()).hexdigest() in stored
    assert hashlib.sha256(upload_token.encode()).hexdigest() in stored
    assert token_of(text) not in stored and upload_token not in stored


def test_viewer_needs_an_airflow_user_and_lists_pilots_and_logs(cfg, bootstrap_server):
    (iid,), text = launch(cfg)
    assert upload(bootstrap_server, token_of(text), "early.log", b"hello <pilot>", iid=iid).status_code == 200
    base = f"{bootstrap_server.url}/glidein/pilots"
    for path in ("/", f"/aws-us-east-1/{iid}", f"/aws-us-east-1/{iid}/logs/early.log"):
        assert httpx.get(base + path).status_code == 401
    h = bootstrap_server.admin_headers()
    index = httpx.get(base, headers=h, follow_redirects=True)
    assert index.status_code == 200 and f"<a href='aws-us-east-1/{iid}'>" in index.text
    page = httpx.get(str(index.url.join(f"aws-us-east-1/{iid}")), headers=h)  # follow the link
    assert f"<a href='{iid}/logs/early.log'>" in page.text and "13 bytes" in page.text
    assert httpx.get(str(page.url.join(f"{iid}/logs/early.log")), headers=h).text == "hello <pilot>"
    assert httpx.get(f"{base}/aws-us-east-1/{iid}/logs/early.log", headers=h).text == "hello <pilot>"
    missing = httpx.get(f"{base}/aws-us-east-1/{iid}/logs/none.log", headers=h)
    assert missing.status_code == 404 and "has no log none.log" in missing.text


def test_bad_signature_stops_the_wrapper_before_any_request(cfg, ec2, bootstrap_server, tmp_path):
    (iid,), text = launch(cfg)
    # another key's signature over a body that names the factory's key id (an id is no secret)
    body = U.encode_body(U.parse(text))
    forged = f"#glidein-envelope v1\n{base64.b64encode(body).decode()}\n" \
             f"{base64.b64encode(U.generate_key().sign(body)).decode()}\n"
    envelope = tmp_path / "envelope"
    envelope.write_text(forged)
    vm = VM(tmp_path / "vm", bootstrap_server)
    proc = vm.boot(str(envelope), iid)
    assert proc.returncode == 1
    assert "envelope signature does not verify with the factory key" in proc.stderr
    assert "refusing to run anything" in proc.stderr
    assert not (vm.work / "glidein-startup.sh").exists() and vm.powered_off
    # the token in the forged envelope was never sent anywhere: the real pilot can still use it
    assert exchange(bootstrap_server, token_of(text), iid).status_code == 200


def test_wrong_startup_script_hash_stops_the_wrapper_and_its_log_comes_home(cfg, ec2, bootstrap_server, tmp_path):
    (iid,), text = launch(cfg)
    fields = {k: v for k, v in U.parse(text).items() if k != "v"}
    fields["script_sha256"] = hashlib.sha256(b"some other script").hexdigest()
    envelope = tmp_path / "envelope"
    envelope.write_text(U.build("ec2", fields, keys.signing_key(store())))
    vm = VM(tmp_path / "vm", bootstrap_server)
    proc = vm.boot(str(envelope), iid)
    assert proc.returncode == 1
    assert "startup script hash mismatch" in proc.stderr and "not running it" in proc.stderr
    assert not (vm.work / "condor").exists() and vm.powered_off
    logs = bootstrap_server.logs("aws-us-east-1", iid)
    assert "startup script hash mismatch" in logs["glidein.log"]


def test_a_second_boot_is_refused_the_exchange_and_says_so(cfg, ec2, bootstrap_server, tmp_path):
    (iid,), text = launch(cfg)
    envelope = tmp_path / "envelope"
    envelope.write_text(text)
    assert VM(tmp_path / "vm1", bootstrap_server).boot(str(envelope), iid).returncode == 0
    again = VM(tmp_path / "vm2", bootstrap_server)
    proc = again.boot(str(envelope), iid)
    assert proc.returncode == 3
    assert "token exchange refused (HTTP 403)" in proc.stderr and "already exchanged" in proc.stderr
    assert not (again.work / "condor" / "condor_config").exists()
