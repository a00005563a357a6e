"""The deployment recipe in docker/, checked as far as this machine allows (Docker does not run here).

- compose.yaml validates against the Compose Specification's JSON schema (check-jsonschema's
  vendored copy), and every variable it needs without a default is in .env.example;
- every command a service built from our image runs (its command and its healthcheck) exists:
  Airflow's CLI and ours are asked for their help, and each option used must be in it;
- the Dockerfile builds on Airflow's image at the Airflow and Python versions the package requires;
- the reverse proxy's config (docker/haproxy.cfg) is checked by haproxy itself and run on
  127.0.0.1 in front of two stand-in backends: the public side answers only /glidein/bootstrap/...,
  over TLS when given a certificate, and survives one backend dying. Without haproxy installed
  (``.ci/run`` installs it) only the routes it declares are checked.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import tomllib
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO

DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
HAPROXY_CFG = DOCKER / "haproxy.cfg"
OUR_IMAGE = "airflow-glidein"
# Tools of the images themselves, not of any CLI we could ask here (apache/airflow ships curl).
IMAGE_TOOLS = {"curl"}


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def our_services() -> dict[str, dict]:
    return {name: s for name, s in compose()["services"].items() if OUR_IMAGE in str(s.get("image", ""))}


def test_compose_file_matches_the_compose_specification():
    done = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                           str(COMPOSE)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_variable_without_a_default_is_in_the_env_example():
    text = COMPOSE.read_text()
    needed = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)\}", text))  # ${VAR}; not $${VAR} nor ${VAR:-default}
    example = {line.split("=", 1)[0] for line in (DOCKER / ".env.example").read_text().splitlines()
               if line and not line.startswith("#")}
    assert needed, "compose.yaml names no variables: the pattern is wrong"
    assert needed <= example, f"not in docker/.env.example: {sorted(needed - example)}"


def test_the_topology_has_every_component():
    services = compose()["services"]
    commands = {name: s.get("command") for name, s in our_services().items()}
    runs = [" ".join(c) for c in commands.values() if c]
    for component in ("airflow scheduler", "airflow dag-processor", "airflow triggerer", "airflow db migrate",
                      "python -m airflow_glidein sync-pools"):
        assert any(r.startswith(component) for r in runs), component
    assert sum(r.startswith("airflow api-server") for r in runs) == 2
    assert sum(r.startswith("airflow celery worker") for r in runs) == 2
    assert {"postgres", "redis", "proxy", "htcondor-cm", "htcondor-ap"} <= set(services)
    assert services["htcondor-cm"]["image"].startswith("htcondor/cm:")
    assert services["htcondor-ap"]["image"].startswith("htcondor/submit:")
    assert services["htcondor-ap"]["environment"]["CONDOR_HOST"] == "cm"
    # Only the proxy is published beyond the host's loopback.
    public = {name: p for name, s in services.items() for p in s.get("ports", [])
              if not str(p).startswith("127.0.0.1:")}
    assert set(public) <= {"proxy", "htcondor-cm"}, public
    env = our_services()["scheduler"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    for key in ("AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__CORE__EXECUTION_API_SERVER_URL", "AIRFLOW__API__BASE_URL",
                "AIRFLOW__GLIDEIN__CONFIG_FILE", "AIRFLOW__GLIDEIN__PILOT_LOGS"):
        assert key in env, key


def _commands() -> list[tuple[str, list[str]]]:
    """(service, argv) of every command and healthcheck a service of our image runs."""
    out = []
    for name, svc in our_services().items():
        if svc.get("command"):
            out.append((name, list(svc["command"])))
        test = (svc.get("healthcheck") or {}).get("test")
        if test and test[0] == "CMD":
            out.append((name, list(test[1:])))
        elif test and test[0] == "CMD-SHELL":
            out.append((name, shlex.split(test[1].replace("$${", "${"))))
    return out


# Walks Airflow's CLI parser (with the CeleryExecutor configured, or the celery group is absent) and
# ours, in one process: for each command line, the words that name commands and the options the
# command they reach takes.
_WALKER = r"""
import argparse, json, os, sys
os.environ["AIRFLOW__CORE__EXECUTOR"] = "CeleryExecutor"

def walk(parser, argv):
    path = []
    for word in [a for a in argv if not a.startswith("-")]:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            break
        parser = subs[0].choices[word]
        path.append(word)
    leaf = not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)
    options = sorted(o for a in parser._actions for o in a.option_strings)
    return {"path": path, "leaf": leaf, "options": options}

class Built(Exception):
    pass

def glidein_parser():
    from airflow_glidein import cli
    real = argparse.ArgumentParser.parse_args
    def capture(self, *a, **k):
        raise Built(self)
    argparse.ArgumentParser.parse_args = capture
    try:
        cli.main([])
    except Built as b:
        return b.args[0]
    finally:
        argparse.ArgumentParser.parse_args = real

from airflow.cli import cli_parser
parsers = {"airflow": cli_parser.get_parser(), "glidein": glidein_parser()}
asks = json.loads(sys.stdin.read())
print(json.dumps([walk(parsers[which], argv) for which, argv in asks]))
"""


def _walk(asks: list[tuple[str, list[str]]]) -> list[dict]:
    """[(which CLI, argv after the program)] -> what each reaches: {"path", "leaf", "options"}."""
    done = subprocess.run([sys.executable, "-c", _WALKER], input=json.dumps(asks), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _problems(asks: list[tuple[str, str, list[str]]]) -> list[str]:
    """(service, CLI, argv) -> what does not exist: a command that is not one, an option it lacks."""
    out = []
    for (service, which, argv), found in zip(asks, _walk([(w, a) for _, w, a in asks])):
        words = [a for a in argv if not a.startswith("-")]
        if not found["leaf"] or not found["path"] or found["path"] != words[:len(found["path"])]:
            out.append(f"{service}: {' '.join(argv)}: no such command")
            continue
        for opt in (a.split("=", 1)[0] for a in argv if a.startswith("-")):
            if opt not in found["options"]:
                out.append(f"{service}: {' '.join(found['path'])} has no option {opt}")
    return out


def test_every_command_a_service_runs_exists():
    cmds = _commands()
    assert len(cmds) >= 12, cmds
    asks = []
    for service, argv in cmds:
        if argv[0] == "airflow":
            asks.append((service, "airflow", argv[1:]))
        elif argv[:3] == ["python", "-m", "airflow_glidein"]:
            asks.append((service, "glidein", argv[3:]))
        elif argv[0] == "celery":
            app = argv[argv.index("--app") + 1]
            module, _, attr = app.rpartition(".")
            assert hasattr(importlib.import_module(module), attr), f"{service}: celery app {app} does not exist"
            assert argv[argv.index("--app") + 2:][:2] == ["inspect", "ping"], argv
        else:
            assert argv[0] in IMAGE_TOOLS, f"{service}: {argv[0]} is neither Airflow's CLI nor ours"
    assert {w for _, w, _ in asks} == {"airflow", "glidein"}
    assert _problems(asks) == []


def test_a_misspelt_command_is_caught():
    """The check above can fail: an unknown command or option is named."""
    assert _problems([("a", "airflow", ["schedular"]), ("b", "airflow", ["celery", "worker", "--concurency", "8"]),
                      ("c", "glidein", ["sync-pool"]), ("d", "airflow", ["celery"]),
                      ("e", "airflow", ["api-server", "--port", "8080"])]) == [
        "a: schedular: no such command", "b: celery worker has no option --concurency",
        "c: sync-pool: no such command", "d: celery: no such command"]


def test_dockerfile_builds_on_airflows_image_at_the_required_versions():
    text = (DOCKER / "Dockerfile").read_text()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    version = re.search(r"^ARG AIRFLOW_VERSION=(\S+)", text, flags=re.MULTILINE).group(1)
    airflow_req = next(d for d in project["dependencies"] if d.startswith("apache-airflow=="))
    assert version.startswith(airflow_req.split("==")[1].rstrip("*")), (version, airflow_req)
    assert compose()["x-airflow"]["build"]["args"]["AIRFLOW_VERSION"].endswith(f"{version}}}")
    py = "python" + ".".join(project["requires-python"].split(",")[0].lstrip(">=").split(".")[:2])
    assert f"FROM apache/airflow:${{AIRFLOW_VERSION}}-{py}" in text
    extra = re.search(r"/opt/airflow-glidein\[(\w+)\]", text).group(1)
    assert extra in project["optional-dependencies"]
    for src in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, flags=re.MULTILINE):
        for part in src.split():
            assert (REPO / part.rstrip("/")).exists(), f"Dockerfile copies {part}, which is not in the repository"


def test_pyproject_extras_name_what_a_celery_deployment_needs():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[<>=\[; ]", d)[0] for d in extras["celery"]}
    assert {"apache-airflow-providers-celery", "psycopg2-binary", "redis"} <= names
    assert "psycopg2-binary" in {re.split(r"[<>=\[; ]", d)[0] for d in extras["postgres"]}


# ---- the reverse proxy --------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Backend:
    """A stand-in API server: answers every path with its name, and the health check."""

    def __init__(self, name: str) -> None:
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self):
                body = f"{name} {self.command} {self.path} xff={self.headers.get('X-Forwarded-For')}".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = _answer

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.addr = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _tls_pem(tmp_path: Path) -> tuple[Path, Path]:
    """A CA and a certificate for 127.0.0.1 (one PEM with the key, as haproxy's crt wants)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from tests.pki import CA, NOW, _name, _pem

    ca = CA("Site CA")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("glidein.example.org")).issuer_name(ca.name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca.key, hashes.SHA256()))
    pem, ca_file = tmp_path / "tls.pem", tmp_path / "ca.pem"
    pem.write_text(_pem(cert) + _pem(key))
    ca_file.write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    return pem, ca_file


HAPROXY = shutil.which("haproxy") or (Path("/usr/sbin/haproxy") if Path("/usr/sbin/haproxy").exists() else None)


@pytest.fixture
def proxy(tmp_path):
    if HAPROXY is None:
        pytest.skip("haproxy is not installed (.ci/run installs it); test_proxy_routes_declared checks the file")
    backends = [Backend("api1"), Backend("api2")]
    pem, ca_file = _tls_pem(tmp_path)
    public, internal = _free_port(), _free_port()
    env = {**os.environ, "GLIDEIN_PUBLIC_BIND": f"127.0.0.1:{public}", "GLIDEIN_INTERNAL_BIND": f"127.0.0.1:{internal}",
           "GLIDEIN_API_1": backends[0].addr, "GLIDEIN_API_2": backends[1].addr, "GLIDEIN_TLS_CERT": str(pem)}
    check = subprocess.run([str(HAPROXY), "-c", "-f", str(HAPROXY_CFG)], env=env, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    proc = subprocess.Popen([str(HAPROXY), "-db", "-f", str(HAPROXY_CFG)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", internal), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, "haproxy did not start"
            time.sleep(0.1)
    ctx = ssl.create_default_context(cafile=str(ca_file))
    yield {"public": f"https://127.0.0.1:{public}", "internal": f"http://127.0.0.1:{internal}", "ssl": ctx,
           "backends": backends}
    proc.terminate()
    proc.wait(10)
    for b in backends:
        b.stop()


def _get(url: str, ctx=None, method: str = "GET") -> tuple[int, str]:
    import httpx

    r = httpx.request(method, url, verify=ctx if ctx is not None else True, timeout=30)
    return r.status_code, r.text


def test_proxy_exposes_only_the_bootstrap_routes_over_tls(proxy):
    pub, ctx = proxy["public"], proxy["ssl"]
    code, body = _get(f"{pub}/glidein/bootstrap/pubkey.pem", ctx)
    assert code == 200 and "/glidein/bootstrap/pubkey.pem" in body
    assert "xff=127.0.0.1" in body  # the client's address, set by the proxy (not taken from the client)
    assert _get(f"{pub}/glidein/bootstrap/exchange?instance_id=i-1", ctx, "POST")[0] == 200
    for path in ("/", "/api/v2/dags", "/execution/task-instances/x/run", "/glidein/pilots/e/p/logs.json",
                 "/glidein/dashboard/", "/glidein/bootstrap/../pilots/e/p/logs.json",
                 "/glidein/bootstrap/%2e%2e/pilots/", "/auth/token"):
        assert _get(f"{pub}{path}", ctx)[0] == 404, path
    assert _get(f"{pub}/glidein/bootstrap/logs/x", ctx, "DELETE")[0] == 404
    # plain HTTP is not spoken on the TLS port
    with pytest.raises(Exception):
        _get(pub.replace("https://", "http://") + "/glidein/bootstrap/pubkey.pem")
    # the internal side is the whole of Airflow
    code, body = _get(f"{proxy['internal']}/api/v2/dags")
    assert code == 200 and "/api/v2/dags" in body


def test_proxy_survives_an_api_server_dying(proxy):
    pub, ctx = proxy["public"], proxy["ssl"]
    seen = {_get(f"{pub}/glidein/bootstrap/startup.sh", ctx)[1].split()[0] for _ in range(6)}
    assert seen == {"api1", "api2"}  # round robin over both
    proxy["backends"][0].stop()
    answers = [_get(f"{pub}/glidein/bootstrap/startup.sh", ctx) for _ in range(6)]
    assert all(code == 200 and body.startswith("api2") for code, body in answers), answers


def test_proxy_routes_declared():
    """What the file says, checked without haproxy: the public side allows only the bootstrap prefix."""
    text = HAPROXY_CFG.read_text()
    public = text.split("frontend pilots", 1)[1].split("\nfrontend ", 1)[0]
    assert "acl bootstrap path_beg /glidein/bootstrap/" in public
    assert "http-request deny deny_status 404 unless bootstrap safe_method" in public
    assert "ssl crt" in public
    assert "use_backend" not in public and public.count("default_backend api_servers") == 1
