"""Factory inventory + reaping cycle at scale, on moto's EC2 server (one process per region on 127.0.0.1).

20 entries in 4 regions; N pilots spread evenly; 10% of them past their
lifetime. Times the factory's own operators as the factory DAG runs them:
the per-endpoint tasks (inventory, then reap_pilots and the verify check)
side by side, as the DAG's endpoint task groups do on several workers, and
plan_cycle between them. Counts the provider API calls at the servers and
reports the peak memory of the factory process. Each region is its own
endpoint, as on AWS, so each gets its own moto server (and connection).
The servers run through bench/moto_indexed_tags.py, which looks an instance's
tags up by id: stock moto scans every tag in the region for each instance it
lists, so its listings grow with the square of the pilots and the benchmark
would time moto, not the factory (--stock-moto shows that).

Goals (issue 7): calls grow with entries and pages, not with pilots; the
cycle takes at most 60 s on this machine at 10,000 pilots.

    python -m bench.bench_factory_scale [--pilots 10000] [--also 2000] [--stock-moto]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REGIONS = ["us-east-1", "us-west-2", "eu-west-1", "eu-central-1"]
ENTRIES = 20
LIFETIME = 3600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Moto:
    """moto's server in its own process; every request is one line on its log."""

    def __init__(self, workdir: Path, name: str, stock: bool = False):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"moto-{name}.log"
        server = ["-m", "moto.server"] if stock else [str(REPO / "bench" / "moto_indexed_tags.py")]
        self.proc = subprocess.Popen([sys.executable, *server, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        for _ in range(200):
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/").read()
                return
            except Exception:
                time.sleep(0.1)
        raise RuntimeError("moto server did not start")

    def calls(self) -> int:
        return sum(1 for line in open(self.log) if '"POST / HTTP' in line)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def config(workdir: Path) -> Path:
    entries = [{
        "name": f"e{n:02d}", "middleware": "ec2", "region": REGIONS[n % len(REGIONS)], "image": "ami-1e749f67",
        "flavor": "c5.xlarge", "cores": 4, "trust_domain": f"aws-{REGIONS[n % len(REGIONS)]}",
        "limits": {"max_pilots": 100000, "max_idle": 100000, "max_per_cycle": 0},
        "policy": {"max_lifetime": LIFETIME},
    } for n in range(ENTRIES)]
    cfg = {
        "factory": {"name": "bench-factory", "bootstrap_url": "http://127.0.0.1:8080/glidein"},
        "entries": entries,
        "frontends": [{"name": "cms", "demand": {"queue_file": "none.json"}, "entries": [e["name"] for e in entries],
                       "credentials": [f"aws-{r}" for r in REGIONS] + [f"pool-{r}" for r in REGIONS]}],
        "credentials": [
            {"id": f"aws-{r}", "type": "ec2_key_pair", "conn_id": f"bench_aws_{r.replace('-', '_')}",
             "trust_domain": f"aws-{r}", "purpose": "provision"} for r in REGIONS
        ] + [
            {"id": f"pool-{r}", "type": "idtoken", "conn_id": "bench_pool", "trust_domain": f"aws-{r}",
             "purpose": "pilot"} for r in REGIONS
        ],
    }
    import yaml

    path = workdir / "glidein.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def populate(motos: dict[str, Moto], pilots: int) -> tuple[float, float]:
    """Make the pilots, the 10% that will be old first; returns (launch time of the young, duration)."""
    import boto3

    clients = {r: boto3.client("ec2", region_name=r, endpoint_url=motos[r].url, aws_access_key_id="k",
                               aws_secret_access_key="s") for r in REGIONS}
    per_entry = pilots // ENTRIES

    def make(n: int, entry: int, batch: str) -> None:
        for start in range(0, n, 500):
            count = min(500, n - start)
            tags = {"glidein:factory": "bench-factory", "glidein:frontend": "cms", "glidein:entry": f"e{entry:02d}",
                    "glidein:launch": f"bench.cms.e{entry:02d}.{batch}{start}", "glidein:request": "bench"}
            clients[REGIONS[entry % len(REGIONS)]].run_instances(
                ImageId="ami-1e749f67", InstanceType="c5.xlarge", MinCount=count, MaxCount=count,
                TagSpecifications=[{"ResourceType": "instance",
                                    "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}])

    t0 = time.time()
    old = per_entry // 10
    for e in range(ENTRIES):
        make(old, e, "old")
    time.sleep(2.5)  # LaunchTime has 1 s resolution: keep the two cohorts apart
    young_from = time.time() - 0.5
    for e in range(ENTRIES):
        make(per_entry - old, e, "young")
    return young_from, time.time() - t0


def cycle(cfg_path: Path, motos: dict[str, Moto], young_from: float) -> dict:
    """One inventory + reaping cycle through the factory's operators; the clock makes the first cohort old."""
    from concurrent.futures import ThreadPoolExecutor

    from airflow_glidein.config import get_config
    from airflow_glidein.operators import InventoryOperator, PlanCycleOperator, ReapPilotsOperator
    from airflow_glidein.operators.base import GlideinBaseOperator
    from airflow_glidein.sensors.pilots import still_present

    # the factory's clock, frozen where every young pilot is just under its lifetime and the old cohort past it
    real_now = GlideinBaseOperator.now
    GlideinBaseOperator.now = lambda op: young_from + LIFETIME - 1
    endpoints = {ep: [e.name for e in es] for ep, es in get_config(str(cfg_path)).endpoints().items()}

    class TI:
        pushed: dict = {}

        def xcom_push(self, key, value):
            self.pushed[key] = value

    def calls() -> int:
        return sum(m.calls() for m in motos.values())

    def per_endpoint(make):
        with ThreadPoolExecutor(len(endpoints)) as pool:  # the DAG's endpoint task groups, side by side
            return list(pool.map(lambda names: make(names).execute(ctx), endpoints.values()))

    ctx = {"run_id": "bench", "ti": TI()}
    figures = {}
    calls0 = calls()
    t = time.perf_counter()
    invs = per_endpoint(lambda names: InventoryOperator(task_id="inventory", entries=names, config_file=str(cfg_path)))
    figures["inventory_s"] = time.perf_counter() - t
    figures["inventory_calls"] = calls() - calls0
    t1 = time.perf_counter()
    PlanCycleOperator(task_id="plan_cycle", requests={}, inventory=invs, config_file=str(cfg_path)).execute(ctx)
    figures["plan_s"] = time.perf_counter() - t1
    actions = ctx["ti"].pushed["actions"]
    calls1 = calls()
    t2 = time.perf_counter()
    done = [t for r in per_endpoint(lambda names: ReapPilotsOperator(
        task_id="reap_pilots", actions=actions, entries=names, config_file=str(cfg_path))) for t in r]
    figures["reap_s"] = time.perf_counter() - t2
    figures["reap_calls"] = calls() - calls1
    calls2 = calls()
    t3 = time.perf_counter()
    with ThreadPoolExecutor(len(endpoints)) as pool:
        left = [i for part in pool.map(lambda names: still_present(str(cfg_path), [d for d in done if d["entry"] in names]),
                                       endpoints.values()) for i in part]
    figures["verify_s"] = time.perf_counter() - t3
    figures["verify_calls"] = calls() - calls2
    figures["cycle_s"] = time.perf_counter() - t
    figures["calls"] = calls() - calls0
    figures["pilots_listed"] = sum(c.get("total", 0) for inv in invs for fes in inv["counts"].values()
                                   for c in fes.values())
    figures["terminated"] = len(actions)
    figures["left_after_terminate"] = len(left)
    GlideinBaseOperator.now = real_now
    return figures


def run(pilots: int, stock: bool) -> dict:
    work = Path(tempfile.mkdtemp(prefix="glidein-bench-"))
    os.environ.update({
        "AIRFLOW_HOME": str(work), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{work}/airflow.db",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING", "AWS_EC2_METADATA_DISABLED": "true",
        "GLIDEIN_STATE_URL": f"sqlite:///{work}/state.db",
    })
    motos = {r: Moto(work, r, stock) for r in REGIONS}
    try:
        for r, moto in motos.items():
            os.environ[f"AIRFLOW_CONN_BENCH_AWS_{r.replace('-', '_').upper()}"] = json.dumps({
                "conn_type": "aws", "login": "k", "password": "s", "extra": {"endpoint_url": moto.url}})
        os.environ["AIRFLOW_CONN_BENCH_POOL"] = json.dumps({"conn_type": "generic", "password": "x.y.z"})
        cfg_path = config(work)
        young_from, setup_s = populate(motos, pilots)
        figures = cycle(cfg_path, motos, young_from)
        figures["setup_s"] = setup_s
        return figures
    finally:
        for moto in motos.values():
            moto.stop()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pilots", type=int, default=10000)
    ap.add_argument("--also", type=int, default=2000, help="a smaller scale, to show calls do not grow with pilots")
    ap.add_argument("--stock-moto", action="store_true", help="moto's server as shipped (tag lookups scan the region)")
    args = ap.parse_args()
    import logging

    logging.disable(logging.WARNING)
    results = {n: run(n, args.stock_moto) for n in sorted({args.also, args.pilots}) if n}
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"Factory inventory + reaping cycle on moto's EC2 servers, {ENTRIES} entries in {len(REGIONS)} regions "
          f"(one endpoint, server and task group each; {'stock moto' if args.stock_moto else 'moto, tags indexed'})")
    print(f"{'pilots':>8} {'listed':>7} {'reaped':>7} {'calls':>6} {'inv s':>7} {'plan s':>7} {'reap s':>7} "
          f"{'verify s':>8} {'cycle s':>8} {'left':>5}")
    for n, f in results.items():
        print(f"{n:>8} {f['pilots_listed']:>7} {f['terminated']:>7} {f['calls']:>6} {f['inventory_s']:>7.1f} "
              f"{f['plan_s']:>7.2f} {f['reap_s']:>7.1f} {f['verify_s']:>8.1f} {f['cycle_s']:>8.1f} "
              f"{f['left_after_terminate']:>5}")
    big = results[max(results)]
    pages = len(REGIONS) * -(-max(results) // len(REGIONS) // 1000)
    print(f"API calls at {max(results)} pilots: {big['inventory_calls']} listing + {big['reap_calls']} terminate + "
          f"{big['verify_calls']} verify (moto pages by reservation; AWS, at 1,000 instances a page, would take "
          f"{pages} listing calls)")
    print(f"peak RSS of the factory process: {peak_mb:.0f} MB")
    calls = [f["calls"] for f in results.values()]
    ok_calls = len(set(calls)) == 1
    ok_time = big["cycle_s"] <= 60
    ok_gone = all(f["left_after_terminate"] == 0 and f["terminated"] == n // 10 for n, f in results.items())
    print(f"goal: calls independent of pilots ({'met' if ok_calls else 'NOT met'}: {calls}); "
          f"cycle <= 60 s at {max(results)} pilots ({'met' if ok_time else 'NOT met'}: {big['cycle_s']:.1f} s); "
          f"every old pilot reaped and gone ({'met' if ok_gone else 'NOT met'})")
    return 0 if ok_calls and ok_time and ok_gone else 1


if __name__ == "__main__":
    sys.exit(main())
