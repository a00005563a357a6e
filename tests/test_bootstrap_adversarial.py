"""The bootstrap service as an attacker sees it: someone with a VM's UserData (its bootstrap token, the URL), on 127.0.0.1.

Each test runs the standalone service's app (what ``serve-bootstrap`` runs)
under uvicorn on 127.0.0.1, fresh (its per-process limits and caches start
empty), over the test's own state store and moto. Clients come from other
loopback addresses (127.0.0.2, ...) where the address matters.

What is shown refused: draining the API budget with made-up instance ids,
stalling requests on a spent budget, uploads with a used-up token, floods
from one address or with one token, parallel uploads past the pilot's quota,
an upload that fails replacing a good log, forged log lines, a claimed
instance id the EC2 identity document contradicts, a second claim of a bound
id, replays, other launches' tokens, path tricks, huge headers, bodies that
never end.
"""

from __future__ import annotations

import concurrent.futures
import logging
import re
import secrets
import socket
import subprocess
import threading
import time
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from airflow_glidein import budget, pilotdb
from airflow_glidein import userdata as U
from airflow_glidein.config import get_config
from airflow_glidein.state import store
from tests.helpers import example_config, write_config
from tests.pilot_helpers import launch
from tests.standins.metadata import identity_document, identity_key, identity_signature
from tests.test_metrics import statsd  # noqa: F401 - the StatsD listener fixture

pytestmark = pytest.mark.usefixtures("airflow_db")
ENTRY = "aws-us-east-1"
MiB = 1024 * 1024


class Service:
    """The standalone bootstrap app (``serve-bootstrap``'s) under uvicorn on 127.0.0.1, in a thread."""

    def __init__(self) -> None:
        import uvicorn

        from airflow_glidein.bootstrap.app import create_app

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(ui=False)
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="off",
                                                    proxy_headers=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        self.clients: dict[str, httpx.Client] = {}
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the service did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        for c in self.clients.values():
            c.close()
        self.server.should_exit = True
        self.thread.join(10)

    def client(self, address: str = "127.0.0.1") -> httpx.Client:
        """A client whose connections come from ``address`` (one per address: making one takes a while)."""
        if address not in self.clients:
            self.clients[address] = httpx.Client(base_url=f"{self.url}/bootstrap", timeout=120,
                                                 transport=httpx.HTTPTransport(local_address=address))
        return self.clients[address]

    def exchange(self, token: str, iid: str, address: str = "127.0.0.1", **kw: Any) -> httpx.Response:
        return self.client(address).post("/exchange", params={"instance_id": iid},
                                         headers={"Authorization": f"Bearer {token}", **kw.pop("headers", {})}, **kw)

    def upload(self, token: str, name: str, data: Any, iid: str | None = None, address: str = "127.0.0.1",
               **kw: Any) -> httpx.Response:
        return self.client(address).put(f"/logs/{name}", params={"instance_id": iid} if iid else {}, content=data,
                                        headers={"Authorization": f"Bearer {token}", **kw.pop("headers", {})}, **kw)


def logs_of(entry: str, pilot_id: str) -> dict[str, bytes]:
    from airflow_glidein.bootstrap.logs import LogStore

    ls = LogStore.from_config()
    return {n: ls.read(entry, pilot_id, n) for n, _ in ls.list(entry, pilot_id)}


def fields(reply: httpx.Response) -> dict[str, str]:
    return dict(line.split("=", 1) for line in reply.text.splitlines())


def token_of(text: str) -> str:
    return U.parse(text)["token"]


def budget_used(entry: str = ENTRY) -> int:
    return budget.ApiBudget.for_entry(get_config().entry(entry)).used()


def record(iids: list[str], launch_id: str, entry: str = ENTRY) -> None:
    """What the factory writes when it creates instances: each id as requested, under its launch."""
    now = time.time()
    pilotdb.save_pilots(store(), [{"id": i, "entry": entry, "frontend": "cms", "launch": launch_id,
                                   "launched": now, "state": "requested", "updated": now} for i in iids])


@pytest.fixture
def cfg(ec2, tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW__GLIDEIN__PILOT_LOGS", f"file://{tmp_path}/pilot-logs")
    monkeypatch.setenv("AIRFLOW__GLIDEIN__BOOTSTRAP_LISTING_INTERVAL", "600")  # no second listing by slowness
    data = example_config()
    data["factory"].update({"retry_delay": 0, "bootstrap_url": "http://127.0.0.1:9/glidein"})
    write_config(tmp_path, data, monkeypatch)
    return data


@pytest.fixture
def service(cfg):
    svc = Service()
    yield svc
    svc.stop()


def launch_id_of(text: str) -> str:
    return U.parse(text)["launch_id"]


# -- the API budget and the provider's listings ---------------------------------------------------
def test_made_up_ids_list_a_launch_once_whatever_is_asked_across_processes(service, cfg):
    iids, text = launch(cfg, count=2)
    tok = token_of(text)
    other = Service()  # a second replica over the same state store
    try:
        before = budget_used()
        for n in range(10):
            replica = service if n % 2 else other
            r = replica.exchange(tok, f"i-{n:017x}", address=f"127.0.0.{2 + n}")
            assert r.status_code == 403 and "is not an instance of launch" in r.text, r.text
            up = replica.upload(tok, "glidein.log", b"junk", iid=f"i-{n + 100:017x}", address=f"127.0.0.{30 + n}")
            assert up.status_code == 403, up.text
        assert budget_used() - before == 1  # one listing for 20 made-up ids on two replicas
        ok = other.exchange(tok, iids[1])  # the real ones are in that listing: no call either
        assert ok.status_code == 200, ok.text
        assert budget_used() - before == 1
    finally:
        other.stop()


def test_the_factory_record_answers_without_any_provider_call(service, cfg, monkeypatch, ec2):
    iids, text = launch(cfg, count=4)
    record(iids[:3], launch_id_of(text))
    others, text_b = launch(cfg, count=1)
    record(others, launch_id_of(text_b))
    # the provider is unreachable now: only the factory's record can answer
    monkeypatch.setenv("AIRFLOW_CONN_GLIDEIN_AWS_DEMO", '{"conn_type": "aws", "login": "x", "password": "y", '
                       '"extra": {"endpoint_url": "http://127.0.0.1:9", "region_name": "us-east-1"}}')
    before = budget_used()
    for iid in iids[:3]:
        assert service.exchange(token_of(text), iid).status_code == 200
    assert budget_used() == before
    # a record under another launch does not make an instance this launch's
    monkeypatch.setenv("AIRFLOW_CONN_GLIDEIN_AWS_DEMO", ec2.connection_json())
    stranger = service.exchange(token_of(text), others[0])
    assert stranger.status_code == 403 and "is not an instance of launch" in stranger.text


def test_a_spent_budget_is_a_503_at_once_and_holds_no_worker(service, cfg, tmp_path):
    iids, text = launch(cfg, count=2)
    record(iids[:1], launch_id_of(text))
    data = example_config()
    data["factory"].update(cfg["factory"])
    data["entries"][0]["api_budget"] = {"requests": 1, "per_seconds": 3600}
    write_config(tmp_path, data)
    assert budget_used() >= 1  # the launch spent the window's only call
    tok = token_of(text)
    replies = []
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # the old service slept up to an hour on each
        futures = [pool.submit(service.exchange, tok, f"i-{n:017x}", f"127.0.0.{2 + n}") for n in range(8)]
        replies = [f.result(timeout=120) for f in futures]
    for r in replies:
        assert r.status_code == 503, r.text
        assert 0 < int(r.headers["Retry-After"]) <= 60 and "API budget" in r.text
    # the unrecorded real instance waits for the budget too; the recorded one needs no call
    assert service.exchange(tok, iids[1]).status_code == 503
    assert service.exchange(tok, iids[0]).status_code == 200


def test_a_used_up_token_uploads_nothing_and_never_over_a_pilots_log(service, cfg):
    (iid,), text = launch(cfg, count=1)
    tok = token_of(text)
    up = fields(service.exchange(tok, iid))["upload_token"]
    assert service.upload(up, "glidein.log", b"the pilot's own log", address="127.0.0.2").status_code == 200
    before = budget_used()
    over = service.upload(tok, "glidein.log", b"forged", iid=iid)
    assert over.status_code == 403 and "need its upload token" in over.text
    for n in range(5):
        r = service.upload(tok, "early.log", b"junk", iid=f"i-{n:017x}")
        assert r.status_code == 403 and "exchanges of launch" in r.text and "are used" in r.text, r.text
    assert budget_used() == before  # refused before any listing
    assert logs_of(ENTRY, iid) == {"glidein.log": b"the pilot's own log"}


# -- rate limits ---------------------------------------------------------------------------------
def test_an_address_with_many_refusals_is_turned_away_others_are_not(service, cfg, monkeypatch):
    monkeypatch.setenv("AIRFLOW__GLIDEIN__BOOTSTRAP_ADDRESS_REFUSALS", "10")  # per minute
    (iid,), text = launch(cfg, count=1)
    statuses = [service.exchange(secrets.token_urlsafe(32), iid, address="127.0.0.2").status_code
                for _ in range(30)]
    assert statuses[:10] == [403] * 10 and statuses[-1] == 429
    turned = service.exchange(token_of(text), iid, address="127.0.0.2")
    assert turned.status_code == 429 and int(turned.headers["Retry-After"]) >= 1
    # forging X-Forwarded-For does not help: no proxy is trusted
    spoofed = service.exchange(token_of(text), iid, address="127.0.0.2", headers={"X-Forwarded-For": "10.0.0.9"})
    assert spoofed.status_code == 429
    assert service.exchange(token_of(text), iid, address="127.0.0.3").status_code == 200


def test_behind_a_trusted_proxy_the_forwarded_address_is_limited(service, cfg, monkeypatch):
    monkeypatch.setenv("AIRFLOW__GLIDEIN__BOOTSTRAP_ADDRESS_REFUSALS", "5")
    monkeypatch.setenv("AIRFLOW__GLIDEIN__BOOTSTRAP_TRUSTED_PROXIES", "127.0.0.7/32, 10.200.0.0/16")
    (iid,), text = launch(cfg, count=1)

    def via_proxy(forwarded: str, token: str) -> int:
        return service.exchange(token, iid, address="127.0.0.7", headers={"X-Forwarded-For": forwarded}).status_code

    # the client put 10.9.9.9 in front; our proxies (127.0.0.7 and an inner 10.200.0.1) appended what they saw
    codes = [via_proxy(f"10.9.9.{n}, 192.0.2.1, 10.200.0.1", secrets.token_urlsafe(32)) for n in range(12)]
    assert codes[0] == 403 and codes[-1] == 429  # 192.0.2.1 is limited, whatever it puts in front
    assert via_proxy("192.0.2.2, 10.200.0.1", token_of(text)) == 200  # another client behind the same proxy


def test_one_token_is_limited_whatever_address_it_comes_from(service, cfg):
    iids, text = launch(cfg, count=3)  # a 3-VM launch's token may be refused 16 times a minute
    record(iids, launch_id_of(text))
    assert service.exchange(token_of(text), iids[0]).status_code == 200  # what succeeds does not count
    codes = [service.exchange(token_of(text), f"i-{n:017x}", address=f"127.0.1.{n + 1}") for n in range(20)]
    assert {r.status_code for r in codes[:16]} == {403}
    assert codes[-1].status_code == 429 and "too many refused requests with this bootstrap token" in codes[-1].text
    assert int(codes[-1].headers["Retry-After"]) >= 1
    late = service.exchange(token_of(text), iids[1], address="127.0.1.99")  # the launch's own VMs wait too
    assert late.status_code == 429


# -- pilot logs -----------------------------------------------------------------------------------
def test_parallel_uploads_with_one_token_stay_within_the_pilot_quota(service, cfg, tmp_path):
    (iid,), text = launch(cfg, count=1)
    up = fields(service.exchange(token_of(text), iid))["upload_token"]
    body = tmp_path / "15MiB.log"
    body.write_bytes(b"x" * (15 * MiB))
    header = tmp_path / "auth"
    header.write_text(f"Authorization: Bearer {up}\n")

    def put(n: int) -> tuple[str, str]:  # curl, as the wrapper: a refusal arrives before the body is sent
        out = tmp_path / f"reply{n}"
        code = subprocess.run(["curl", "-sS", "-T", str(body), "-H", f"@{header}", "-o", str(out), "-w",
                               "%{http_code}", f"{service.url}/bootstrap/logs/part{n}.log"],
                              capture_output=True, text=True, timeout=300).stdout
        return code, out.read_text()

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        replies = list(pool.map(put, range(10)))
    stored = logs_of(ENTRY, iid)
    assert sum(len(v) for v in stored.values()) <= 64 * MiB
    assert sorted(code for code, _ in replies) == ["200"] * 4 + ["413"] * 6, replies  # 4 x 15 MiB fit in 64 MiB
    assert len(stored) == 4 and all("remaining log quota" in r for code, r in replies if code == "413")


def test_files_per_pilot_are_capped_and_a_log_can_still_be_replaced(service, cfg, monkeypatch):
    monkeypatch.setenv("AIRFLOW__GLIDEIN__PILOT_LOG_MAX_FILES", "3")
    (iid,), text = launch(cfg, count=1)
    up = fields(service.exchange(token_of(text), iid))["upload_token"]
    for n in range(3):
        assert service.upload(up, f"f{n}.log", b"x").status_code == 200
    fourth = service.upload(up, "f3.log", b"x")
    assert fourth.status_code == 413 and "has its 3 files" in fourth.text
    assert service.upload(up, "f0.log", b"newer").status_code == 200
    assert logs_of(ENTRY, iid)["f0.log"] == b"newer" and len(logs_of(ENTRY, iid)) == 3


def raw_put(port: int, path: str, token: str, length: int, sent: bytes, then: str = "close") -> bytes:
    """A PUT announcing ``length`` bytes that sends ``sent`` and then closes (or waits for the reply)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=120)
    s.sendall(f"PUT {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
              f"Content-Length: {length}\r\n\r\n".encode() + sent)
    if then == "close":
        s.close()
        return b""
    reply = b""
    while chunk := s.recv(65536):
        reply += chunk
        if b"\r\n\r\n" in reply:
            break
    s.close()
    return reply


def wait_for(check, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while not check():
        assert time.time() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_a_failed_upload_never_replaces_a_good_log(service, cfg, monkeypatch, caplog):
    monkeypatch.setenv("AIRFLOW__GLIDEIN__PILOT_LOG_MAX_FILE_BYTES", "1000")
    monkeypatch.setenv("AIRFLOW__GLIDEIN__PILOT_LOG_MAX_PILOT_BYTES", "1004")
    monkeypatch.setenv("AIRFLOW__GLIDEIN__BOOTSTRAP_BODY_IDLE_TIMEOUT", "1")
    (iid,), text = launch(cfg, count=1)
    up = fields(service.exchange(token_of(text), iid))["upload_token"]
    assert service.upload(up, "glidein.log", b"good").status_code == 200

    def chunks():  # chunked: no Content-Length to refuse up front
        for _ in range(10):
            yield b"y" * 500

    assert service.upload(up, "glidein.log", chunks()).status_code == 413  # oversize
    caplog.set_level(logging.INFO)
    raw_put(service.port, "/bootstrap/logs/glidein.log", up, 900, b"half a log")  # the client goes away
    wait_for(lambda: any("disconnected" in r.getMessage() for r in caplog.records))
    slow = raw_put(service.port, "/bootstrap/logs/glidein.log", up, 900, b"a trickle", then="wait")
    assert slow.startswith(b"HTTP/1.1 408"), slow
    assert logs_of(ENTRY, iid) == {"glidein.log": b"good"}
    disconnects = [r for r in caplog.records if "disconnected" in r.getMessage()]
    assert len(disconnects) == 1 and disconnects[0].exc_info is None
    assert not any(r.exc_info for r in caplog.records) and "Traceback" not in caplog.text
    # nothing is left behind: no temporary file, no reservation holding the quota (4 + 1000 = the 1004 cap)
    assert [p.name for p in (cfg_logs_dir(iid)).iterdir()] == ["glidein.log"]
    assert service.upload(up, "other.log", b"z" * 1000).status_code == 200


def cfg_logs_dir(iid: str):
    from airflow_glidein.bootstrap.logs import LogStore

    return LogStore.from_config().pilot_dir(ENTRY, iid)


def test_a_body_that_never_ends_does_not_stall_the_service(service, cfg, monkeypatch):
    monkeypatch.setenv("AIRFLOW__GLIDEIN__BOOTSTRAP_BODY_IDLE_TIMEOUT", "30")
    (iid, _), text = launch(cfg, count=2)
    tok = token_of(text)
    hangers = []
    for _ in range(8):  # slowloris: announce a body, send a byte, never finish (the token allows 14 a minute)
        s = socket.create_connection(("127.0.0.1", service.port))
        s.sendall(f"PUT /bootstrap/logs/early.log?instance_id={iid} HTTP/1.1\r\nHost: x\r\n"
                  f"Authorization: Bearer {tok}\r\nContent-Length: 1000\r\n\r\nx".encode())
        hangers.append(s)
    try:
        assert service.exchange(tok, iid).status_code == 200  # answered while they hang
    finally:
        for s in hangers:
            s.close()


# -- what reaches the log -------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["i-1\n2026-01-01 INFO Pilot i-2 exchanged", "i-1\x1b[2J\x1b[31mOK", "i-1\x00x",
                                   "i-1\r\nX", "../../etc/passwd", "i-1 OK"])
def test_request_values_never_forge_a_log_line(service, cfg, caplog, value):
    caplog.set_level(logging.INFO)
    (iid,), text = launch(cfg, count=1)
    r = service.exchange(token_of(text), value)
    assert r.status_code == 400 and r.text.count("\n") == 1
    up = service.upload(token_of(text), "x.log", b"x", iid=value)
    assert up.status_code == 400
    name = service.upload(token_of(text), quote(value.replace("/", "_") + ".log", safe=""), b"x", iid=iid)
    assert name.status_code in (400, 404)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("airflow_glidein")]
    assert lines and all(re.fullmatch(r"[\x20-\x7e]*", line) for line in lines), lines


# -- the instance id a pilot claims -----------------------------------------------------------------
@pytest.fixture
def identity_cert(tmp_path, monkeypatch):
    path = tmp_path / "ec2-identity.pem"
    path.write_text(identity_key()[1])
    monkeypatch.setenv("AIRFLOW__GLIDEIN__EC2_IDENTITY_CERT", str(path))
    return path


def proof(iid: str, key=None, **doc: Any) -> bytes:
    document = identity_document(iid, **doc)
    return (f"identity_document={__import__('base64').b64encode(document).decode()}\n"
            f"identity_signature={''.join(identity_signature(document, key).decode().split())}\n").encode()


def test_ec2_identity_documents_prove_the_claimed_id(service, cfg, identity_cert):
    from cryptography.hazmat.primitives.asymmetric import rsa

    (victim, mine), text = launch(cfg, count=2)
    tok = token_of(text)
    bare = service.exchange(tok, victim)
    assert bare.status_code == 403 and "identity document" in bare.text
    theirs = service.exchange(tok, victim, content=proof(mine))  # my own VM's document, their id
    assert theirs.status_code == 403 and "of another instance" in theirs.text
    forged = service.exchange(tok, victim, content=proof(victim, key=rsa.generate_private_key(65537, 2048)))
    assert forged.status_code == 403 and "does not verify" in forged.text
    region = service.exchange(tok, victim, content=proof(victim, region="eu-west-1"))
    assert region.status_code == 403 and "another region" in region.text
    assert service.exchange(tok, victim, content=b"x" * 20000).status_code == 413
    ok = service.exchange(tok, victim, content=proof(victim))
    assert ok.status_code == 200 and fields(ok)["pilot_id"] == victim
    replay = service.exchange(tok, victim, content=proof(victim))  # the same document again
    assert replay.status_code == 403 and "already exchanged" in replay.text


def test_an_unreadable_identity_certificate_refuses_exchanges_clearly(service, cfg, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("AIRFLOW__GLIDEIN__EC2_IDENTITY_CERT", str(tmp_path / "missing.pem"))
    (iid,), text = launch(cfg, count=1)
    r = service.exchange(token_of(text), iid, content=proof(iid))
    assert r.status_code == 503 and "cannot check instance identity documents" in r.text
    assert any("identity certificate cannot be read (FileNotFoundError)" in rec.getMessage()
               for rec in caplog.records if rec.levelname == "ERROR")
    assert not any(rec.exc_info for rec in caplog.records)


def test_a_second_claim_of_a_bound_id_is_refused_and_reported(service, cfg, statsd, caplog):  # noqa: F811
    caplog.set_level(logging.INFO)
    (iid,), text = launch(cfg, count=1)
    ok = service.exchange(token_of(text), iid)
    assert service.upload(fields(ok)["upload_token"], "a.log", b"12345").status_code == 200
    again = service.exchange(token_of(text), iid, address="127.0.0.5")
    assert again.status_code == 403 and "already exchanged" in again.text
    assert any("claimed again from 127.0.0.5" in r.getMessage() for r in caplog.records)
    wait_for(lambda: statsd.values("airflow.glidein.bootstrap.refused.rebind"))
    assert statsd.values("airflow.glidein.bootstrap.exchanges.aws-us-east-1") == ["1|c"]
    assert statsd.values("airflow.glidein.bootstrap.uploads.aws-us-east-1") == ["1|c"]
    assert statsd.values("airflow.glidein.bootstrap.upload_bytes.aws-us-east-1") == ["5|c"]
    assert statsd.values("airflow.glidein.bootstrap.listings.aws-us-east-1") == ["1|c"]


# -- replays, other launches, paths, headers ------------------------------------------------------------
def test_tokens_of_other_launches_and_replays_get_nothing(service, cfg):
    (a,), text_a = launch(cfg, count=1)
    (b,), text_b = launch(cfg, count=1)
    ok = service.exchange(token_of(text_b), b)
    up_b = fields(ok)["upload_token"]
    assert service.exchange(up_b, b).status_code == 403  # an upload token never exchanges
    assert service.exchange(token_of(text_a), b).status_code == 403  # another launch's instance
    assert service.upload(token_of(text_a), "x.log", b"x", iid=b).status_code == 403
    assert service.exchange(token_of(text_b), a).status_code == 403  # launch b is used up
    replay = service.exchange(token_of(text_b), b)
    assert replay.status_code == 403 and "already exchanged" in replay.text


@pytest.mark.parametrize("path", ["/bootstrap/logs/..%2f..%2fx", "/bootstrap/logs/%2e%2e", "/bootstrap/logs/.x.part",
                                  "/bootstrap/logs/a%00b", "/bootstrap/logs/%E2%80%A4%E2%80%A4",
                                  "/bootstrap/logs/x?instance_id=..", "/bootstrap/logs/x?instance_id=a%2f..%2fb"])
def test_path_tricks_are_refused(service, cfg, path):
    (iid,), text = launch(cfg, count=1)
    s = socket.create_connection(("127.0.0.1", service.port), timeout=60)
    s.sendall(f"PUT {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token_of(text)}\r\n"
              "Content-Length: 1\r\nConnection: close\r\n\r\nx".encode())
    reply = s.recv(65536)
    s.close()
    assert reply.startswith(b"HTTP/1.1 400"), reply
    assert not cfg_logs_dir(iid).exists()


def test_huge_headers_and_bodies_are_refused_and_the_service_goes_on(service, cfg):
    (iid,), text = launch(cfg, count=1)
    for headers in ({"Authorization": "Bearer " + "a" * 200_000}, {"X-Junk": "b" * 200_000}):
        try:
            r = service.exchange(token_of(text), iid, headers=headers)
            assert r.status_code == 431 or 400 <= r.status_code < 500 and r.status_code != 403, r.text[:200]
        except httpx.TransportError:  # the server may just close the connection
            pass
    assert service.exchange(token_of(text), iid, content=b"z" * 100_000).status_code == 413
    assert service.exchange(token_of(text), iid).status_code == 200


def test_head_works_on_the_get_routes(service):
    c = service.client()
    for path in ("/startup.sh", "/pubkey.pem"):
        get, head = c.get(path), c.head(path)
        assert get.status_code == head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == str(len(get.content))
