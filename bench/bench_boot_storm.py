"""Boot storm: N pilots in L launches exchange their bootstrap tokens and upload a log, then an attack.

Two bootstrap service processes (``python -m airflow_glidein serve-bootstrap``
on two ports, as two replicas behind a load balancer) share one PostgreSQL
state store (a database ``glidein_service_<random>`` on 127.0.0.1:5432,
dropped at the end; ``--state sqlite`` for a file instead). The factory's
side is done here as the factory does it: each launch registered with its
bootstrap token (``userdata_for``), its instances made at the provider and,
for ``--recorded`` of the launches, recorded in the pilot table; the other
launches make the service list them. The provider is a cheap EC2
DescribeInstances stand-in (bench/ec2_listing_standin.py), reached through
the real EC2 hook and the API budget, which counts the listings per launch.

Pilots are raw HTTP/1.1 clients (a new connection per request, as VMs make)
spread over loopback source addresses 127.0.0.2, 127.0.0.3, ..., at most
``--concurrency`` at once, in random order across launches:

  1. every pilot exchanges its token (POST /bootstrap/exchange);
  2. every pilot uploads a 4 KiB log with its upload token;
  3. for ``--bogus-seconds``, ``--bogus-rate`` bogus requests per second
     (unknown tokens, used-up tokens with made-up ids, uploads with forged
     tokens, from 127.1.0.x) while the pilots of one more launch exchange (from 127.2.0.x).

Goals (issue 16): 10,000 pilots in 100 launches exchange and upload within
5 minutes; at least 200 exchanges/s on this machine; exchange p99 under 1 s;
at most 2 provider listings per launch whatever its number of VMs; a
legitimate exchange answered in under 1 s while 500 bogus requests/s
arrive. Figures are printed beside their goals; the exit status says only
whether every legitimate pilot got through (speed is not a pass/fail here).

    python -m bench.bench_boot_storm [--pilots 10000] [--launches 100] [--state postgres|sqlite]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
PG = "postgresql://postgres@127.0.0.1:5432"
ENTRY = "storm"
LOG = b"x" * 4096


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


# -- the state store ----------------------------------------------------------------------------
def create_database() -> str:
    from sqlalchemy import create_engine, text

    name = f"glidein_service_{secrets.token_hex(4)}"
    engine = create_engine(f"{PG}/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return name


def drop_database(name: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(f"{PG}/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


# -- the factory's side -------------------------------------------------------------------------
def config(path: Path, url: str, pilots_per_launch: int) -> None:
    batch = max(pilots_per_launch, 1)
    path.write_text(yaml.safe_dump({
        "factory": {"name": "storm-factory", "bootstrap_url": f"{url}/glidein", "collector": None},
        "entries": [{"name": ENTRY, "middleware": "ec2", "region": "us-east-1", "image": "ami-1e749f67",
                     "flavor": "c5.xlarge", "cores": 4, "memory_mb": 8192, "trust_domain": "aws",
                     "limits": {"max_pilots": 100000, "max_idle": 100000, "max_per_cycle": 100000,
                                "batch_size": batch}}],
        "frontends": [{"name": "cms", "demand": {"queue_file": str(path.parent / "queue.json")},
                       "entries": [ENTRY], "credentials": ["ec2", "pool"]}],
        "credentials": [
            {"id": "ec2", "type": "ec2_key_pair", "conn_id": "bench_ec2", "trust_domain": "aws",
             "purpose": "provision"},
            {"id": "pool", "type": "idtoken", "conn_id": "bench_pool_token", "trust_domain": "aws",
             "purpose": "pilot"},
        ],
    }, sort_keys=False))


def register(ec2, launches: int, per_launch: int, recorded: float, tag: str) -> list[dict]:
    """Launches as the factory makes them: registered, made at the provider, some recorded. Returns their pilots."""
    from airflow_glidein import pilotdb
    from airflow_glidein import pilots as P
    from airflow_glidein import userdata as U
    from airflow_glidein.bootstrap.launches import userdata_for
    from airflow_glidein.config import get_config
    from airflow_glidein.state import store

    cfg = get_config()
    entry = cfg.entry(ENTRY)
    st = store()
    pilots = []
    for n in range(launches):
        launch_id = f"storm.{tag}.{n:04d}"
        text = userdata_for(cfg, entry, {"launch_id": launch_id, "frontend": "cms", "count": per_launch,
                                         "pilot": "pool", "start_expr": "true",
                                         "policy": cfg.policy_for(entry, "cms").model_dump()}, "bench_ec2", st)
        token = U.parse(text)["token"]
        ids = [f"i-{secrets.token_hex(9)[:17]}" for _ in range(per_launch)]
        ec2.add(ids, {P.TAG_FACTORY: cfg.factory.name, P.TAG_ENTRY: ENTRY, P.TAG_LAUNCH: launch_id,
                      P.TAG_FRONTEND: "cms"})
        if n < recorded * launches:
            now = time.time()
            pilotdb.save_pilots(st, [{"id": i, "entry": ENTRY, "frontend": "cms", "launch": launch_id,
                                      "launched": now, "state": "requested", "updated": now} for i in ids])
        pilots += [{"launch": launch_id, "token": token, "id": i, "recorded": n < recorded * launches}
                   for i in ids]
    return pilots


# -- the services -------------------------------------------------------------------------------
def start_services(cfg_path: Path, ports: list[int], env: dict[str, str], workdir: Path) -> list[subprocess.Popen]:
    import urllib.request

    procs = [subprocess.Popen([sys.executable, "-m", "airflow_glidein", "serve-bootstrap", str(cfg_path),
                               "--port", str(p)], cwd=REPO, env=env, stdout=open(workdir / f"service-{p}.log", "w"),
                              stderr=subprocess.STDOUT) for p in ports]
    for p, proc in zip(ports, procs):
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{p}/glidein/bootstrap/startup.sh", timeout=5).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"service on {p} did not start: {(workdir / f'service-{p}.log').read_text()}")
                time.sleep(0.2)
    return procs


# -- HTTP/1.1, as a VM's curl speaks it ---------------------------------------------------------
RETRIES = Counter()  # 429/503 answers a pilot waited on and tried again, as the wrapper does


async def request(port: int, source: str, method: str, path: str, token: str, body: bytes = b"") -> tuple[int, bytes]:
    """One request on a new connection; a 429 or 503 is tried again after its Retry-After (4 times at most)."""
    for attempt in range(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        try:
            writer.write(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                         f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            data = await reader.read()
        finally:
            writer.close()
        head, _, rest = data.partition(b"\r\n\r\n")
        code = int(head[9:12])
        if code not in (429, 503) or attempt == 4:
            return code, rest
        RETRIES[code] += 1
        wait = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                     if line.lower().startswith(b"retry-after:")), 1)
        await asyncio.sleep(min(wait, 60))
    raise AssertionError("unreachable")


class KeepAlive:
    """One persistent connection (an attacker's: cheaper than a new one per request)."""

    def __init__(self, port: int, source: str) -> None:
        self.port, self.source, self.rw = port, source, None

    async def send(self, method: str, path: str, token: str, body: bytes = b"") -> int:
        for _ in range(2):
            if self.rw is None:
                self.rw = await asyncio.open_connection("127.0.0.1", self.port, local_addr=(self.source, 0))
            reader, writer = self.rw
            try:
                writer.write(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
                             f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                if b"connection: close" in head.lower():
                    writer.close()
                    self.rw = None
                return int(head[9:12])
            except (OSError, asyncio.IncompleteReadError):
                self.rw = None
        return 0


def source_address(n: int, addresses: int) -> str:
    """The n-th pilot's address: 127.0.0.2, 127.0.0.3, ... (250 per /24)."""
    k = n % addresses
    return f"127.0.{k // 250}.{2 + k % 250}"


async def exchange_all(pilots: list[dict], ports: list[int], concurrency: int, addresses: int) -> dict:
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    by_path: dict[bool, list[float]] = {True: [], False: []}
    codes: Counter[int] = Counter()

    async def one(n: int, p: dict) -> None:
        async with gate:
            t = time.perf_counter()
            try:
                code, body = await request(ports[n % len(ports)], source_address(n, addresses), "POST",
                                           f"/glidein/bootstrap/exchange?instance_id={p['id']}", p["token"])
            except OSError:
                code, body = 0, b""
            latencies.append(time.perf_counter() - t)
            by_path[p["recorded"]].append(latencies[-1])
            codes[code] += 1
            if code == 200:
                p["upload"] = dict(line.split("=", 1) for line in body.decode().splitlines())["upload_token"]

    t0 = time.perf_counter()
    await asyncio.gather(*(one(n, p) for n, p in enumerate(pilots)))
    return {"seconds": time.perf_counter() - t0, "latencies": latencies, "codes": codes, "by_path": by_path}


async def upload_all(pilots: list[dict], ports: list[int], concurrency: int, addresses: int) -> dict:
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    codes: Counter[int] = Counter()

    async def one(n: int, p: dict) -> None:
        async with gate:
            t = time.perf_counter()
            try:
                code, _ = await request(ports[n % len(ports)], source_address(n, addresses), "PUT",
                                        "/glidein/bootstrap/logs/glidein.log", p.get("upload", "none"), LOG)
            except OSError:
                code = 0
            latencies.append(time.perf_counter() - t)
            codes[code] += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(one(n, p) for n, p in enumerate(pilots)))
    return {"seconds": time.perf_counter() - t0, "latencies": latencies, "codes": codes}


async def under_attack(legit: list[dict], used: list[dict], ports: list[int], rate: float, seconds: float) -> dict:
    """``rate`` bogus requests a second (open loop) while ``legit`` pilots exchange, spread over the same time."""
    bogus_codes: Counter[int] = Counter()
    sent = 0
    conns = [KeepAlive(ports[n % len(ports)], f"127.1.0.{1 + n % 20}") for n in range(40)]
    free = asyncio.Queue()
    for c in conns:
        free.put_nowait(c)

    async def bogus(n: int) -> None:
        c = await free.get()
        try:
            kind = n % 3
            if kind == 0:  # a forged token
                code = await c.send("POST", f"/glidein/bootstrap/exchange?instance_id=i-{n:017x}",
                                    secrets.token_urlsafe(32))
            elif kind == 1:  # a used-up launch's token, a made-up instance
                code = await c.send("POST", f"/glidein/bootstrap/exchange?instance_id=i-{n:017x}",
                                    used[n % len(used)]["token"])
            else:  # a log for someone else's instance
                code = await c.send("PUT", f"/glidein/bootstrap/logs/glidein.log?instance_id=i-{n:017x}",
                                    used[n % len(used)]["token"], b"junk" * 64)
            bogus_codes[code] += 1
        finally:
            free.put_nowait(c)

    legit_lat: dict[bool, list[float]] = {True: [], False: []}
    legit_codes: Counter[int] = Counter()

    async def good(n: int, p: dict) -> None:
        t = time.perf_counter()
        try:
            code, _ = await request(ports[n % len(ports)], f"127.2.0.{1 + n % 200}", "POST",
                                    f"/glidein/bootstrap/exchange?instance_id={p['id']}", p["token"])
        except OSError:
            code = 0
        legit_lat[p["recorded"]].append(time.perf_counter() - t)
        legit_codes[code] += 1

    tasks = []
    random.shuffle(legit)
    t0 = time.perf_counter()
    gap = seconds / max(len(legit), 1)
    next_legit = t0 + gap / 2
    k = 0
    while (now := time.perf_counter()) - t0 < seconds:
        due = int((now - t0) * rate)
        while sent < due:
            tasks.append(asyncio.ensure_future(bogus(sent)))
            sent += 1
        while k < len(legit) and now >= next_legit:
            tasks.append(asyncio.ensure_future(good(k, legit[k])))
            k += 1
            next_legit += gap
        await asyncio.sleep(0.002)
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    for c in conns:
        if c.rw:
            c.rw[1].close()
    return {"sent": sent, "done": sum(bogus_codes.values()), "seconds": wall, "bogus_codes": bogus_codes,
            "legit_lat": legit_lat, "legit_codes": legit_codes}


def line(what: str, figure: str, goal: str = "", ok: bool | None = None) -> None:
    verdict = "" if ok is None else ("  [met]" if ok else "  [NOT met]")
    print(f"  {what:<50} {figure:<30} {('goal: ' + goal) if goal else ''}{verdict}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pilots", type=int, default=10000)
    ap.add_argument("--launches", type=int, default=100)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--state", choices=["postgres", "sqlite"], default="postgres")
    ap.add_argument("--recorded", type=float, default=0.5, help="share of launches in the factory's pilot table")
    ap.add_argument("--concurrency", type=int, default=64, help="pilots talking to the service at once")
    ap.add_argument("--addresses", type=int, default=200, help="loopback source addresses of the pilots")
    ap.add_argument("--bogus-rate", type=float, default=500)
    ap.add_argument("--bogus-seconds", type=float, default=20)
    ap.add_argument("--legit", type=int, default=40, help="pilots of one more launch exchanging during the attack")
    ap.add_argument("--lag", type=float, default=0.0, help="s the provider's listing lags behind its creates")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (service logs, pilot logs)")
    ap.add_argument("--cold", action="store_true", help="no warm-up: each process's first listing also builds its "
                                                        "provider client (about 2 s) during the storm")
    args = ap.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="glidein-bootstorm-"))
    os.environ.update({"AIRFLOW_HOME": str(workdir), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"})  # before Airflow loads
    db = create_database() if args.state == "postgres" else None
    url = f"{PG}/{db}" if db else f"sqlite:///{workdir}/glidein_state.db"
    from bench.ec2_listing_standin import EC2Listing

    ec2 = EC2Listing(lag=args.lag).start()
    ports = [free_port() for _ in range(args.processes)]
    cfg_path = workdir / "glidein.yaml"
    (workdir / "queue.json").write_text("[]")
    per_launch = args.pilots // args.launches
    config(cfg_path, f"http://127.0.0.1:{ports[0]}", per_launch)
    env = {
        **os.environ, "AIRFLOW_HOME": str(workdir), "GLIDEIN_STATE_URL": url,
        "AIRFLOW__GLIDEIN__CONFIG_FILE": str(cfg_path), "AIRFLOW__GLIDEIN__PILOT_LOGS": f"file://{workdir}/logs",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_EC2_METADATA_DISABLED": "true",
        "AIRFLOW_CONN_BENCH_EC2": json.dumps({"conn_type": "aws", "login": "bench", "password": "bench",
                                              "extra": {"endpoint_url": ec2.url, "region_name": "us-east-1"}}),
        "AIRFLOW_CONN_BENCH_POOL_TOKEN": json.dumps({"conn_type": "generic", "password": "pool-token"}),
    }
    os.environ.update(env)
    procs: list[subprocess.Popen] = []
    try:
        t = time.perf_counter()
        pilots = register(ec2, args.launches, per_launch, args.recorded, "storm")
        half = args.legit // 2  # during the attack: pilots of a recorded launch and of one the service must list
        legit = register(ec2, 1, half, 1.0, "attack-recorded") + register(ec2, 1, args.legit - half, 0.0,
                                                                          "attack-listed") if args.legit else []
        setup = time.perf_counter() - t
        procs = start_services(cfg_path, ports, env, workdir)
        if not args.cold:  # a running service has its provider client: one listing per process first
            warm = register(ec2, len(ports), 1, 0.0, "warm-up")  # one launch per process: each lists
            asyncio.run(exchange_all(warm, ports, 1, 1))
        random.seed(16)
        random.shuffle(pilots)

        ex = asyncio.run(exchange_all(pilots, ports, args.concurrency, args.addresses))
        up = asyncio.run(upload_all(pilots, ports, args.concurrency, args.addresses))
        attack = asyncio.run(under_attack(legit, pilots, ports, args.bogus_rate, args.bogus_seconds)) \
            if args.bogus_seconds > 0 else None
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
        ec2.stop()
        if db:
            drop_database(db)

    storm = {p["launch"] for p in pilots}
    listings = {launch: ec2.calls.get(launch, 0) for launch in storm}
    unrecorded = {p["launch"] for p in pilots if not p["recorded"]}
    stored = sum(1 for _ in (workdir / "logs" / ENTRY).glob("*/glidein.log")) if (workdir / "logs").exists() else 0
    total = ex["seconds"] + up["seconds"]
    rate = len(pilots) / ex["seconds"]
    p99 = pct(ex["latencies"], 99)
    print(f"Boot storm: {len(pilots)} pilots in {args.launches} launches ({per_launch} VMs each, "
          f"{len(storm) - len(unrecorded)} recorded by the factory), {args.processes} service processes, "
          f"{args.state} state store, {args.concurrency} pilots at once from {args.addresses} addresses, "
          f"{'cold' if args.cold else 'warm (each process listed once before)'}; setup {setup:.1f} s")
    line("exchange + upload, all pilots", f"{total:.1f} s", "<= 300 s", total <= 300)
    line("exchanges per second", f"{rate:.0f}/s", ">= 200/s", rate >= 200)
    line("exchange latency p50 / p99 / max",
         f"{pct(ex['latencies'], 50) * 1000:.0f} / {p99 * 1000:.0f} / {max(ex['latencies']) * 1000:.0f} ms",
         "p99 < 1000 ms", p99 < 1)
    for recorded, what in ((True, "recorded by the factory"), (False, "listed at the provider")):
        lat = ex["by_path"][recorded]
        if lat:
            line(f"  p50 / p99, launches {what}", f"{pct(lat, 50) * 1000:.0f} / {pct(lat, 99) * 1000:.0f} ms")
    line("exchanges answered", dict(sorted(ex["codes"].items())).__repr__())
    line("  429/503 a pilot waited on (all phases)", dict(sorted(RETRIES.items())).__repr__())
    line("uploads per second", f"{len(pilots) / up['seconds']:.0f}/s")
    line("upload latency p50 / p99",
         f"{pct(up['latencies'], 50) * 1000:.0f} / {pct(up['latencies'], 99) * 1000:.0f} ms")
    line("uploads answered", dict(sorted(up["codes"].items())).__repr__(), f"{stored} logs stored")
    worst = max(listings.values(), default=0)
    line("provider listings per launch (max)", f"{worst}", "<= 2", worst <= 2)
    line("  launches listed 0 / 1 / 2+ times",
         f"{sum(v == 0 for v in listings.values())} / {sum(v == 1 for v in listings.values())} / "
         f"{sum(v >= 2 for v in listings.values())}")
    ok = ex["codes"] == Counter({200: len(pilots)}) and up["codes"] == Counter({200: len(pilots)})
    if attack:
        got = attack["done"] / attack["seconds"]
        line("bogus requests answered per second", f"{got:.0f}/s (of {args.bogus_rate:.0f}/s sent)",
             f">= {args.bogus_rate:.0f}/s arriving", got >= 0.95 * args.bogus_rate)
        line("  bogus answers", dict(sorted(attack["bogus_codes"].items())).__repr__())
        for recorded, what in ((True, "recorded"), (False, "listed")):
            lat = attack["legit_lat"][recorded]
            launch = next(p["launch"] for p in legit if p["recorded"] == recorded)
            line(f"legitimate exchange under attack ({what}), max",
                 f"{max(lat) * 1000:.0f} ms (p50 {pct(lat, 50) * 1000:.0f})", "< 1000 ms", max(lat) < 1)
            line("  its launch's provider listings", f"{ec2.calls.get(launch, 0)}", "<= 2")
        line("  legitimate exchanges answered", dict(sorted(attack["legit_codes"].items())).__repr__())
        ok = ok and attack["legit_codes"] == Counter({200: len(legit)})
    if args.keep:
        print(f"  work folder kept: {workdir} (service logs, pilot logs)")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    if db:
        print(f"  state store: database {db} on 127.0.0.1:5432, dropped")
    print("every legitimate pilot got through" if ok else "SOME LEGITIMATE PILOTS DID NOT GET THROUGH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
