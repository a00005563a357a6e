"""Factory inventory + reaping cycle at scale, on moto's EC2 server (one process per region on 127.0.0.1).

20 entries in 4 regions; N pilots spread evenly; 10% of them past their
lifetime. Times the factory's own operators as the factory DAG runs them:
the per-endpoint tasks (inventory, then reap_pilots and the verify check)
side by side, as the DAG's endpoint task groups do on several workers, and
plan_cycle between them. Each endpoint group's step runs in a process of its
own (forked), as each is an Airflow task instance of its own; ``--threads``
runs them as threads of one process instead (one GIL), for comparison.
Counts the provider API calls at the servers and reports the peak memory of
the largest factory process (the bench's, or an endpoint task's). Each region is its own
endpoint, as on AWS, so each gets its own moto server (and connection).
The servers run through bench/moto_indexed_tags.py, which looks an instance's
tags up by id: stock moto scans every tag in the region for each instance it
lists, so its listings grow with the square of the pilots and the benchmark
would time moto, not the factory (--stock-moto shows that).

Goals (issue 7): calls grow with entries and pages, not with pilots; the
cycle takes at most 60 s on this machine at 10,000 pilots.

    python -m bench.bench_factory_scale [--pilots 10000] [--also 2000] [--stock-moto] [--threads]
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
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REGIONS = ["us-east-1", "us-west-2", "eu-west-1", "eu-central-1"]
ENTRIES = 20
LIFETIME = 3600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A provider's server in its own process on 127.0.0.1, so its CPU is not counted as the factory's."""

    def __init__(self, workdir: Path, name: str, argv: list[str], ready: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"{name}.log"
        self.proc = subprocess.Popen([sys.executable, *(a.format(port=self.port) for a in argv)], cwd=REPO,
                                     stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{self.url}{ready}").read()
                return
            except Exception:
                time.sleep(0.1)
        raise RuntimeError(f"{name} did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


class Moto(Server):
    """moto's server; every request is one line on its log."""

    def __init__(self, workdir: Path, name: str, stock: bool = False):
        server = ["-m", "moto.server"] if stock else [str(REPO / "bench" / "moto_indexed_tags.py")]
        super().__init__(workdir, f"moto-{name}", [*server, "-H", "127.0.0.1", "-p", "{port}"], "/moto-api/")

    def calls(self) -> int:
        return sum(1 for line in open(self.log) if '"POST / HTTP' in line)


def entry_name(n: int) -> str:
    return f"e{n:03d}"


def config(workdir: Path, entries: int = ENTRIES, entry_fields: dict | None = None,
           factory_fields: dict | None = None) -> Path:
    """``entries`` EC2 entries over REGIONS; ``entry_fields`` and ``factory_fields`` replace the defaults."""
    entries = [{
        "name": entry_name(n), "middleware": "ec2", "region": REGIONS[n % len(REGIONS)], "image": "ami-1e749f67",
        "flavor": "c5.xlarge", "cores": 4, "trust_domain": f"aws-{REGIONS[n % len(REGIONS)]}",
        "limits": {"max_pilots": 100000, "max_idle": 100000, "max_per_cycle": 0},
        "policy": {"max_lifetime": LIFETIME}, **(entry_fields or {}),
    } for n in range(entries)]
    cfg = {
        "factory": {"name": "bench-factory", "bootstrap_url": "http://127.0.0.1:8080/glidein", **(factory_fields or {})},
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


def run_instances(servers: dict) -> Callable[[str, dict[str, str], int], None]:
    """Make pilots at a server the way the factory does (RunInstances with tags)."""
    import boto3

    clients = {r: boto3.client("ec2", region_name=r, endpoint_url=servers[r].url, aws_access_key_id="k",
                               aws_secret_access_key="s") for r in REGIONS}

    def make(region: str, tags: dict[str, str], count: int) -> None:
        clients[region].run_instances(
            ImageId="ami-1e749f67", InstanceType="c5.xlarge", MinCount=count, MaxCount=count,
            TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}])

    return make


def populate(servers: dict, pilots: int, entries: int = ENTRIES, old: tuple[float, ...] = (0.1,),
             make: Callable[[str, dict[str, str], int], None] | None = None) -> tuple[list[float], float]:
    """Make the pilots: a cohort per share in ``old`` first (oldest first), then the rest. Returns each
    cohort's boundary (a time after it and before the next cohort's launch times) and the duration."""
    make = make or run_instances(servers)
    per_entry = pilots // entries

    def cohort(n: int, batch: str) -> None:
        for e in range(entries):
            for start in range(0, n, 500):
                tags = {"glidein:factory": "bench-factory", "glidein:frontend": "cms", "glidein:entry": entry_name(e),
                        "glidein:launch": f"bench.cms.{entry_name(e)}.{batch}{start}", "glidein:request": "bench"}
                make(REGIONS[e % len(REGIONS)], tags, min(500, n - start))

    t0 = time.time()
    boundaries = []
    for j, share in enumerate(old):
        cohort(int(per_entry * share + 1e-9), f"old{j}-")
        time.sleep(2.5)  # LaunchTime has 1 s resolution: keep the cohorts apart
        boundaries.append(time.time() - 0.5)
    cohort(per_entry - sum(int(per_entry * share + 1e-9) for share in old), "young")
    return boundaries, time.time() - t0


class ParseClock:
    """CPU seconds botocore spends parsing responses (XML to dicts), summed over the threads that parse."""

    def __init__(self) -> None:
        from botocore.parsers import ResponseParser

        self.seconds, self.lock, self.original = 0.0, threading.Lock(), ResponseParser.parse

        def timed(parser, response, shape):
            t = time.thread_time()
            try:
                return self.original(parser, response, shape)
            finally:
                with self.lock:
                    self.seconds += time.thread_time() - t

        ResponseParser.parse = timed


PARSING: ParseClock | None = None
_STEP = None  # the step's per-endpoint work, for the forked children (so lambdas need not pickle)
CHILD_PEAK = 0  # bytes: the largest peak RSS an endpoint process reported


def _endpoint_task(names: list[str]):
    """One endpoint group's step in a forked child, as its own task instance: with state of its own (no
    provider socket or database connection shared with the parent); returns the result, botocore's parse
    seconds and the child's peak RSS (its own: RUSAGE_CHILDREN would count the reaped servers too)."""
    from airflow_glidein import state
    from airflow_glidein.hooks import base

    base._clients.clear()  # their urllib3 sockets are the parent's: build this process's own clients
    if state._store.cache_info().currsize:
        state.store().engine.dispose(close=False)  # drop the parent's connections without closing them
    parsed = PARSING.seconds
    result = _STEP(names)
    return result, PARSING.seconds - parsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def children_cpu() -> float:
    """CPU seconds of this process's children that have been waited for (the endpoint tasks' processes)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def peak_rss() -> int:
    """Bytes: the peak RSS of the largest factory process, this one or an endpoint process."""
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, CHILD_PEAK)


def cycle(cfg_path: Path, servers: dict, now: float, requests: dict | None = None, run_id: str = "bench",
          threads: bool = False) -> dict:
    """One factory cycle through the factory's operators, on the factory's clock ``now``: inventory, plan,
    submit of the deficit (with ``requests``: the frontends' requests, as collect_requests gives them),
    reap, verify. The endpoint groups' steps run in a forked process each (``threads``: a thread each).
    Wall and CPU seconds of each step; CPU is this process's and its endpoint processes' (the servers
    run apart), botocore's parsing likewise."""
    global PARSING
    import multiprocessing
    from concurrent.futures import ThreadPoolExecutor

    from airflow_glidein.config import get_config
    from airflow_glidein.operators import InventoryOperator, PlanCycleOperator, ReapPilotsOperator, SubmitPilotsOperator
    from airflow_glidein.operators.base import GlideinBaseOperator
    from airflow_glidein.sensors.pilots import still_present

    PARSING = PARSING or ParseClock()
    real_now = GlideinBaseOperator.now
    GlideinBaseOperator.now = lambda op: now
    endpoints = {ep: [e.name for e in es] for ep, es in get_config(str(cfg_path)).endpoints().items()}

    class TI:
        def __init__(self):
            self.pushed = {}

        def xcom_push(self, key, value):
            self.pushed[key] = value

    def calls() -> int:
        return sum(m.calls() for m in servers.values())

    def per_endpoint(work):
        """The DAG's endpoint task groups, side by side: a process each (a thread each with ``threads``)."""
        global _STEP, CHILD_PEAK
        if threads:
            with ThreadPoolExecutor(len(endpoints)) as pool:
                return list(pool.map(work, endpoints.values()))
        _STEP = work
        from airflow_glidein import state

        state.store()  # migrated (and SQLite in WAL) before the fork: children do not race to make the schema
        # a fresh pool per step, one task per process, joined so its CPU reaches RUSAGE_CHILDREN
        pool = multiprocessing.get_context("fork").Pool(len(endpoints), maxtasksperchild=1)
        try:
            done = pool.map(_endpoint_task, list(endpoints.values()), chunksize=1)
        finally:
            pool.close()
            pool.join()
            _STEP = None
        PARSING.seconds += sum(parsed for _, parsed, _ in done)
        CHILD_PEAK = max([CHILD_PEAK] + [rss for _, _, rss in done])
        return [result for result, _, _ in done]

    def cpu() -> float:
        return time.process_time() + children_cpu()

    ctx = {"run_id": run_id, "ti": TI()}
    figures: dict = {}
    marks = [(time.perf_counter(), cpu(), PARSING.seconds, calls())]

    def step(name: str) -> None:
        marks.append((time.perf_counter(), cpu(), PARSING.seconds, calls()))
        (w0, c0, p0, n0), (w1, c1, p1, n1) = marks[-2:]
        figures.update({f"{name}_s": w1 - w0, f"{name}_cpu": c1 - c0, f"{name}_parse": p1 - p0,
                        f"{name}_calls": n1 - n0})

    invs = per_endpoint(lambda names: InventoryOperator(
        task_id="inventory", entries=names, config_file=str(cfg_path)).execute(ctx))
    step("inventory")
    work = PlanCycleOperator(task_id="plan_cycle", requests=requests or {}, inventory=invs,
                             config_file=str(cfg_path)).execute(ctx)
    actions = ctx["ti"].pushed["actions"]
    step("plan")
    submitted = [r for part in per_endpoint(lambda names: [  # the mapped submit_pilots of the endpoint's entries
        SubmitPilotsOperator(task_id="submit_pilots", work=w, config_file=str(cfg_path)).execute(ctx)
        for w in work if w["entry"] in names]) for r in part]
    step("submit")
    done = [t for r in per_endpoint(lambda names: ReapPilotsOperator(
        task_id="reap_pilots", actions=actions, entries=names, config_file=str(cfg_path)).execute(ctx)) for t in r]
    step("reap")
    left = [i for part in per_endpoint(lambda names: still_present(
        str(cfg_path), [d for d in done if d["entry"] in names])) for i in part]
    step("verify")
    (w0, c0, p0, n0), (w1, c1, p1, n1) = marks[0], marks[-1]
    figures.update({"cycle_s": w1 - w0, "cpu_s": c1 - c0, "parse_s": p1 - p0, "calls": n1 - n0})
    figures["pilots_listed"] = sum(c.get("total", 0) for inv in invs for fes in inv["counts"].values()
                                   for c in fes.values())
    figures["planned"] = sum(b["count"] for w in work for b in w["launches"])
    figures["created"] = sum(len(x["created"]) for r in submitted for x in r["launched"])
    figures["terminated"] = len(actions)
    figures["left_after_terminate"] = len(left)
    GlideinBaseOperator.now = real_now
    return figures


def workplace() -> Path:
    """A fresh AIRFLOW_HOME and state store for this process (a store's URL is resolved once per process)."""
    work = Path(tempfile.mkdtemp(prefix="glidein-bench-"))
    os.environ.update({
        "AIRFLOW_HOME": str(work), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{work}/airflow.db",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING", "AWS_EC2_METADATA_DISABLED": "true",
        "GLIDEIN_STATE_URL": f"sqlite:///{work}/state.db",
    })
    return work


def connect(servers: dict) -> None:
    """The factory's connections: one per region (its server), and the pool's token."""
    for r, server in servers.items():
        os.environ[f"AIRFLOW_CONN_BENCH_AWS_{r.replace('-', '_').upper()}"] = json.dumps({
            "conn_type": "aws", "login": "k", "password": "s", "extra": {"endpoint_url": server.url}})
    os.environ["AIRFLOW_CONN_BENCH_POOL"] = json.dumps({"conn_type": "generic", "password": "x.y.z"})


def run(pilots: int, stock: bool, threads: bool = False) -> dict:
    work = workplace()
    motos = {r: Moto(work, r, stock) for r in REGIONS}
    try:
        connect(motos)
        cfg_path = config(work)
        (young_from,), setup_s = populate(motos, pilots)
        figures = cycle(cfg_path, motos, young_from + LIFETIME - 1, threads=threads)
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
    ap.add_argument("--threads", action="store_true",
                    help="the endpoint groups as threads of one process (default: a process each, as task instances)")
    args = ap.parse_args()
    import logging

    logging.disable(logging.WARNING)
    results = {n: run(n, args.stock_moto, args.threads) for n in sorted({args.also, args.pilots}) if n}
    peak_mb = peak_rss() / 2**20
    print(f"Factory inventory + reaping cycle on moto's EC2 servers, {ENTRIES} entries in {len(REGIONS)} regions "
          f"(one endpoint, server and task group each, the groups as {'threads' if args.threads else 'processes'}; "
          f"{'stock moto' if args.stock_moto else 'moto, tags indexed'})")
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
    print(f"peak RSS of the largest factory process: {peak_mb:.0f} MB")
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
