"""The real wrapper against the hardened service: EC2 identity documents, https with a private CA, 429/503 retried.

VMs boot as in test_wrapper_paths (real wrapper and startup script, moto's
EC2, the plugin's service in Airflow's API server, a metadata stand-in on
127.0.0.1). The EC2 identity document is signed with the stand-in's key, and
the service is given the stand-in's certificate as ``[glidein]
ec2_identity_cert``. The https service is ``serve-bootstrap --tls-cert
--tls-key`` with a certificate from a CA made here.
"""

from __future__ import annotations

import ipaddress
import subprocess
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from airflow_glidein.config import ConfigError, parse_config
from tests.helpers import example_config, write_config
from tests.pilot_helpers import PILOT, VM, launch, pilot_config, userdata_of
from tests.pki import CA
from tests.standins.metadata import MetadataServer, identity_key
from tests.test_bootstrap_standalone import serve_bootstrap, stop

pytestmark = pytest.mark.usefixtures("airflow_db")


@pytest.fixture
def cfg(ec2, bootstrap_server, tmp_path, monkeypatch):
    return pilot_config(tmp_path, monkeypatch, bootstrap_server)


@pytest.fixture
def identity_cert(tmp_path, monkeypatch):
    path = tmp_path / "ec2-identity.pem"
    path.write_text(identity_key()[1])
    monkeypatch.setenv("AIRFLOW__GLIDEIN__EC2_IDENTITY_CERT", str(path))
    return path


def test_an_ec2_pilot_proves_its_instance_id_with_the_identity_document(cfg, ec2, bootstrap_server, tmp_path,
                                                                        identity_cert):
    (iid,), _ = launch(cfg)
    with MetadataServer("imdsv2", userdata_of(ec2, iid), iid) as md:
        vm = VM(tmp_path / "vm", bootstrap_server, {"GLIDEIN_IMDS_URL": md.url})
        proc = vm.boot()
    assert proc.returncode == 0, proc.stderr
    assert ("GET", "/latest/dynamic/instance-identity/signature", True) in md.requests
    assert "the exchange will carry EC2's signed instance identity document" in proc.stderr


def test_imdsv1_and_wget_carry_the_identity_document_too(cfg, ec2, bootstrap_server, tmp_path, identity_cert):
    (iid,), _ = launch(cfg)
    with MetadataServer("imdsv1", userdata_of(ec2, iid), iid) as md:
        vm = VM(tmp_path / "vm", bootstrap_server, {"GLIDEIN_IMDS_URL": md.url, "GLIDEIN_HTTP_CLIENT": "wget"})
        assert vm.boot().returncode == 0


def test_a_vm_whose_document_names_another_instance_gets_nothing(cfg, ec2, bootstrap_server, tmp_path,
                                                                 identity_cert):
    """A token and UserData copied to a machine of one's own: its document is not the claimed instance's."""
    (iid,), _ = launch(cfg)
    with MetadataServer("imdsv2", userdata_of(ec2, iid), iid, identity={"instanceId": "i-0a0a0a0a0a0a0a0a0"}) as md:
        vm = VM(tmp_path / "vm", bootstrap_server, {"GLIDEIN_IMDS_URL": md.url})
        proc = vm.boot()
    assert proc.returncode == 3
    assert "token exchange refused (HTTP 403)" in proc.stderr and "of another instance" in proc.stderr
    assert not (vm.work / "condor" / "tokens.d" / "pilot.idtoken").exists()


def server_certificate(ca: CA, tmp_path) -> tuple[str, str]:
    """A certificate for 127.0.0.1 signed by ``ca``: (cert file, key file)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "glidein bootstrap")]))
            .issuer_name(ca.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca.key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "server.pem", tmp_path / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


@pytest.mark.parametrize("client", ["curl", "wget"])
def test_https_with_a_private_ca(cfg, ec2, bootstrap_server, tmp_path, monkeypatch, client):
    ca = CA("Glidein Test Private CA")
    cert, key = server_certificate(ca, tmp_path)
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    proc, url = serve_bootstrap(tmp_path / "glidein.yaml", "--tls-cert", cert, "--tls-key", key, scheme="https",
                                verify=str(bundle))
    try:
        cfg["factory"]["bootstrap_url"] = f"{url}/glidein"
        write_config(tmp_path, cfg, monkeypatch)
        (iid,), text = launch(cfg)
        envelope = tmp_path / "envelope"
        envelope.write_text(text)
        lost = VM(tmp_path / "vm0", bootstrap_server, {"GLIDEIN_HTTP_CLIENT": client})
        refused = lost.boot(str(envelope), iid)  # no CA bundle: the service's certificate is not trusted
        assert refused.returncode == 1 and "cannot fetch the startup script" in refused.stderr
        vm = VM(tmp_path / "vm", bootstrap_server, {"GLIDEIN_CA_BUNDLE": str(bundle), "GLIDEIN_HTTP_CLIENT": client})
        booted = vm.boot(str(envelope), iid)
        assert booted.returncode == 0, booted.stderr
        assert "StandinParams.json" in bootstrap_server.logs("aws-us-east-1", iid)
    finally:
        stop(proc)


def test_plain_http_off_loopback_needs_insecure_http():
    data = example_config()
    data["factory"]["bootstrap_url"] = "http://factory.example.org/glidein"
    with pytest.raises(ConfigError) as exc:
        parse_config(data, "glidein.yaml")
    assert any(p.startswith("factory: bootstrap_url: plain http off this machine") for p in exc.value.problems)
    assert "factory.example.org" not in str(exc.value)  # the value is not echoed
    data["factory"]["insecure_http"] = True
    assert parse_config(data, "glidein.yaml").factory.insecure_http
    for url in ("https://factory.example.org/glidein", "http://127.0.0.1:8080/glidein", "http://localhost/glidein"):
        data = example_config()
        data["factory"]["bootstrap_url"] = url
        assert parse_config(data, "glidein.yaml").factory.bootstrap_url == url


class Busy:
    """An HTTP server that answers 503 (or 429) with Retry-After a few times, then 200."""

    def __init__(self, busy: int, code: int = 503) -> None:
        self.hits = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.hits += 1
                status, body = (code, b"error=busy\n") if outer.hits <= busy else (200, b"ok\n")
                self.send_response(status)
                if status != 200:
                    self.send_header("Retry-After", "1")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("client", ["curl", "wget"])
@pytest.mark.parametrize("code", [503, 429])
def test_the_pilot_waits_as_told_on_429_and_503(tmp_path, client, code):
    busy = Busy(2, code)
    try:
        out = subprocess.run(["sh", "-c", f'. "{PILOT}/glidein-lib.sh"; http GET "$0" "$1"', f"{busy.url}/x",
                              str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                             env={"PATH": "/usr/bin:/bin", "GLIDEIN_HTTP_CLIENT": client})
    finally:
        busy.close()
    assert out.stdout.strip() == "200" and busy.hits == 3, out
    assert out.stderr.count(f"HTTP {code} from {busy.url}/x: trying again in 1 s") == 2
    assert (tmp_path / "out").read_text() == "ok\n" and not (tmp_path / "out.rh").exists()
