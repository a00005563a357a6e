"""The factory's cycle at 100,000 pilots in 200 entries, under listing lag; moto at 10,000 and 20,000 beside it.

Each scale runs in a process of its own (so its peak memory and CPU are its
own), with one provider server process per region (4 regions, 50 entries
each; each region is an endpoint with its task group, as on AWS). A cycle is
the factory's operators as the factory DAG runs them (bench_factory_scale's
``cycle``): inventory per endpoint side by side, plan_cycle, submit_pilots
of the deficit, reap_pilots, verify. Each endpoint group's step runs in a
forked process of its own, as each is an Airflow task instance (on Celery
workers, its own process), so the regions' listings use separate cores;
``--threads`` runs them as threads of one process (one GIL) instead. Every cycle a cohort of 2% of the
pilots is past its lifetime (the factory's clock is set so): the cycle reaps
it and launches its replacement, so each cycle lists, plans, creates and
terminates.

At 100,000 pilots the listings come from bench/ec2_listing_standin.py
(pre-rendered pages: moto's own listing costs about 1.5 ms of server CPU
per instance listed and would be timed instead of the factory; each
instance carries all of EC2's description, as AWS sends it, so botocore
parses as much as it would there; ``--lean``: id, state, launch time and
tags only), with
``--lag`` s of listing lag in real time: what a cycle creates is missing
from the next cycle's listing, and only the launch records
(``pilotdb.LaunchLog``: the ids each create returned, written at once)
keep the factory from creating it again. After the last cycle the server
is asked what it really holds: every entry must hold its level, not one
pilot more (duplicates = 0). moto (tags indexed, bench/moto_indexed_tags.py)
runs the same cycles at 10,000 and 20,000 pilots, without lag (moto's
listings are consistent).

CPU is the factory's: the bench process's time.process_time plus its
endpoint processes' (RUSAGE_CHILDREN, read after each step's pool is
joined; the servers run apart and are waited for only at the end);
botocore's parsing of the responses is timed apart (thread CPU inside
botocore.parsers.ResponseParser.parse, each endpoint process returning its
own). Peak RSS is the largest factory process's (the bench's, or an
endpoint process's as it reports its own ru_maxrss): the 2 GiB goal is per
factory task process.

Goals (issue 14), printed PASS/FAIL: at 100,000 pilots in 200 entries the
cycle (median of ``--cycles``) takes at most 60 s, the peak RSS of a factory
task process is at most 2 GiB, 0 duplicates. The exit status says only whether there were
no duplicates and every reaped pilot went (speed is not pass/fail here).

    python -m bench.bench_factory_100k [--pilots 100000] [--entries 200] [--cycles 5] [--lag 30]
                                       [--moto 10000,20000] [--moto-cycles 3] [--threads] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

from bench.bench_factory_scale import LIFETIME, REGIONS, Moto, Server, config, connect, cycle, entry_name, \
    peak_rss, populate, workplace

REPO = Path(__file__).resolve().parent.parent
COHORT = 0.02  # share of the pilots past their lifetime at each cycle
GIB = 1024 ** 3


class Standin(Server):
    """The pre-rendered EC2 stand-in, in its own process."""

    def __init__(self, workdir: Path, name: str, lag: float, lean: bool):
        super().__init__(workdir, f"standin-{name}", ["-m", "bench.ec2_listing_standin", "--port", "{port}",
                                                      "--lag", str(lag), *(["--lean"] if lean else [])], "/")

    def stats(self) -> dict:
        return json.loads(urllib.request.urlopen(self.url).read())

    def calls(self) -> int:
        return sum(self.stats()["calls"].values())

    def seed(self, tags: dict[str, str], count: int) -> None:
        form = {"Action": "BenchSeed", "Count": count}
        for n, (k, v) in enumerate(tags.items(), 1):
            form.update({f"Tag.{n}.Key": k, f"Tag.{n}.Value": v})
        urllib.request.urlopen(self.url, data=urlencode(form).encode()).read()


def holdings(kind: str, servers: dict) -> tuple[dict[str, int], dict[str, int], int]:
    """What the servers really hold, lag aside: live pilots per entry and per launch, and how many the
    listing does not show yet."""
    per_entry: dict[str, int] = {}
    per_launch: dict[str, int] = {}
    hidden = 0
    for region, server in servers.items():
        if kind == "standin":
            st = server.stats()
            for mine, theirs in ((per_entry, st["live_per_entry"]), (per_launch, st["live_per_launch"])):
                for k, v in theirs.items():
                    mine[k] = mine.get(k, 0) + v
            hidden += st["hidden"]
            continue
        import boto3

        client = boto3.client("ec2", region_name=region, endpoint_url=server.url, aws_access_key_id="k",
                              aws_secret_access_key="s")
        for page in client.get_paginator("describe_instances").paginate(Filters=[
                {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]}]):
            for res in page["Reservations"]:
                for inst in res["Instances"]:
                    tags = {t["Key"]: t["Value"] for t in inst.get("Tags", [])}
                    per_entry[tags["glidein:entry"]] = per_entry.get(tags["glidein:entry"], 0) + 1
                    per_launch[tags["glidein:launch"]] = per_launch.get(tags["glidein:launch"], 0) + 1
    return per_entry, per_launch, hidden


def one(kind: str, pilots: int, entries: int, cycles: int, lag: float, grace: int, lean: bool,
        profile: bool, threads: bool = False) -> dict:
    """One scale, in this process: populate, ``cycles`` back-to-back cycles, then count duplicates."""
    import logging

    logging.disable(logging.WARNING)
    work = workplace()
    servers = {r: Standin(work, r, lag, lean) if kind == "standin" else Moto(work, r) for r in REGIONS}
    try:
        connect(servers)
        cfg_path = config(work, entries, entry_fields={
            "limits": {"max_pilots": 10_000_000, "max_idle": 10_000_000, "max_per_cycle": 10_000_000},
            # every pilot is aged to just under its lifetime (see ``cycle``): none is "expiring" here
            "policy": {"max_lifetime": LIFETIME, "min_idle_lifetime": 0},
            "api_budget": {"requests": 10_000_000, "per_seconds": 300},  # the budget is bench_budget's matter
            "listing_grace": grace,
        }, factory_fields={"limits": {"max_pilots": 10_000_000, "max_idle": 10_000_000}})
        make = (lambda region, tags, count: servers[region].seed(tags, count)) if kind == "standin" else None
        boundaries, setup_s = populate(servers, pilots, entries, (COHORT,) * cycles, make)
        level = pilots // entries
        requests = {"cms": {"frontend": "cms", "entries": {
            entry_name(n): {"idle": level, "provision": f"aws-{REGIONS[n % len(REGIONS)]}",
                            "pilot": f"pool-{REGIONS[n % len(REGIONS)]}"} for n in range(entries)}}}
        rows = []
        for k in range(cycles):
            hidden = holdings(kind, servers)[2] if kind == "standin" else 0
            prof = None
            if profile and k == cycles - 1:
                import cProfile

                prof = cProfile.Profile()
                prof.enable()
            # the factory's clock: cohort k (and those before it) is past its lifetime, the rest just under
            f = cycle(cfg_path, servers, boundaries[k] + LIFETIME - 1, {**requests, "cms": {
                **requests["cms"], "cycle": f"c{k}"}}, run_id=f"bench-{k}", threads=threads)
            if prof:
                prof.disable()
                import pstats

                pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(25)
            rows.append({**f, "hidden_at_start": hidden})
        per_entry, per_launch, _ = holdings(kind, servers)
        made = {lid: n for lid, n in per_launch.items() if not lid.startswith("bench.cms.")}  # the factory's
        return {
            "kind": kind + ("-lean" if lean and kind == "standin" else ""), "pilots": pilots, "entries": entries,
            "lag": lag if kind == "standin" else 0.0,
            "setup_s": setup_s, "cycles": rows, "level": level,
            "duplicates": sum(max(0, per_entry.get(entry_name(n), 0) - level) for n in range(entries)),
            "short": sum(max(0, level - per_entry.get(entry_name(n), 0)) for n in range(entries)),
            "launches": len(made), "largest_launch": max(made.values(), default=0),
            "peak_rss": peak_rss(), "threads": threads,
        }
    finally:
        for server in servers.values():
            server.stop()


def in_child(kind: str, pilots: int, args: argparse.Namespace, cycles: int) -> dict:
    argv = [sys.executable, "-m", "bench.bench_factory_100k", "--one", kind, "--pilots", str(pilots),
            "--entries", str(args.entries), "--cycles", str(cycles), "--lag", str(args.lag),
            "--listing-grace", str(args.listing_grace), *(["--lean"] if args.lean else []),
            *(["--threads"] if args.threads else [])]
    out = subprocess.run(argv + (["--profile"] if args.profile and kind == "standin" else []), cwd=REPO,
                         capture_output=True, text=True)
    if args.profile and kind == "standin":
        print(out.stderr[out.stderr.find("   Ordered by"):][:6000], file=sys.stderr)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{kind} at {pilots} pilots failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pilots", type=int, default=100_000)
    ap.add_argument("--entries", type=int, default=200)
    ap.add_argument("--cycles", type=int, default=5, help="back-to-back cycles at --pilots (the median is reported)")
    ap.add_argument("--lag", type=float, default=30.0, help="s a new instance is missing from the stand-in's listings")
    ap.add_argument("--moto", default="10000,20000", help="pilots on moto, comma-separated ('' for none)")
    ap.add_argument("--moto-cycles", type=int, default=3)
    ap.add_argument("--listing-grace", type=int, default=300,
                    help="the entries' listing_grace (0 shows what the launch records prevent: duplicates)")
    ap.add_argument("--lean", action="store_true", help="the stand-in's instances carry only id, state, launch "
                    "time and tags (by default, all of EC2's description, as botocore would parse from AWS)")
    ap.add_argument("--threads", action="store_true", help="the endpoint groups as threads of one process "
                    "(default: a forked process each, as Airflow task instances)")
    ap.add_argument("--profile", action="store_true", help="cProfile the last stand-in cycle (to stderr; "
                    "the bench process only: with --threads, the endpoint groups too)")
    ap.add_argument("--one", choices=["standin", "moto"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(one(args.one, args.pilots, args.entries, args.cycles, args.lag, args.listing_grace,
                                        args.lean, args.profile, args.threads)))
        return 0

    load = os.getloadavg()[0]
    runs = [in_child("standin", args.pilots, args, args.cycles)]
    runs += [in_child("moto", int(n), args, args.moto_cycles) for n in args.moto.split(",") if n.strip()]
    print(f"Factory cycle (inventory, plan, submit of the deficit, reap, verify) in {args.entries} entries over "
          f"{len(REGIONS)} regions (a server process and task group each, the groups as "
          f"{'threads of one process' if args.threads else 'a process each'}); {COHORT:.0%} of the pilots reaped and "
          f"replaced per cycle; {os.cpu_count()} cores, load average {load:.1f} before, {os.getloadavg()[0]:.1f} after")
    head = (f"{'server':>8} {'pilots':>7} {'cycle':>5} {'hidden':>6} {'known':>7} {'made':>5} {'reaped':>6} "
            f"{'calls':>5} {'inv s':>6} {'plan s':>6} {'sub s':>6} {'reap s':>6} {'ver s':>6} {'cycle s':>7} "
            f"{'cpu s':>6} {'parse s':>7}")
    print(head)
    for r in runs:
        for k, c in enumerate(r["cycles"]):
            print(f"{r['kind']:>8} {r['pilots']:>7} {k:>5} {c['hidden_at_start']:>6} {c['pilots_listed']:>7} "
                  f"{c['created']:>5} {c['terminated']:>6} {c['calls']:>5} {c['inventory_s']:>6.1f} "
                  f"{c['plan_s']:>6.1f} {c['submit_s']:>6.1f} {c['reap_s']:>6.1f} {c['verify_s']:>6.1f} "
                  f"{c['cycle_s']:>7.1f} {c['cpu_s']:>6.1f} {c['parse_s']:>7.2f}")
    print()
    print(f"{'server':>8} {'pilots':>7} {'lag s':>5} {'median cycle s':>14} {'CPU ms/pilot':>12} "
          f"{'botocore parse ms/pilot':>23} {'peak RSS MiB':>12} {'duplicates':>10} {'short':>5}")
    for r in runs:
        cs = r["cycles"]
        per = [c["cpu_s"] / c["pilots_listed"] * 1000 for c in cs]
        parse = [c["parse_s"] / c["pilots_listed"] * 1000 for c in cs]
        r["median_s"] = statistics.median(c["cycle_s"] for c in cs)
        r["cpu_ms"], r["parse_ms"] = statistics.median(per), statistics.median(parse)
        print(f"{r['kind']:>8} {r['pilots']:>7} {r['lag']:>5.0f} {r['median_s']:>14.1f} {r['cpu_ms']:>12.3f} "
              f"{r['parse_ms']:>23.3f} {r['peak_rss'] / 2**20:>12.0f} {r['duplicates']:>10} {r['short']:>5}")
    big = runs[0]
    cs = big["cycles"]
    med = min(cs, key=lambda c: abs(c["cycle_s"] - big["median_s"]))
    phases = {p: med[f"{p}_cpu"] for p in ("inventory", "plan", "submit", "reap", "verify")}
    top = max(phases, key=phases.get)
    print(f"\nAt {big['pilots']} pilots (the median cycle): the factory's CPU is {med['cpu_s']:.1f} s of "
          f"{med['cycle_s']:.1f} s wall ({med['cpu_s'] / med['cycle_s']:.0%}); botocore's parsing "
          f"{med['parse_s']:.1f} s of it; by step (CPU s): "
          + ", ".join(f"{p} {v:.1f}" for p, v in phases.items())
          + f"; most in {top}.")
    lagged = max((c["hidden_at_start"] for c in cs[1:]), default=0)
    print(f"Listing lag {big['lag']:.0f} s: up to {lagged} pilots made by the previous cycle were not listed when "
          f"a cycle began; {big['launches']} launches made at most {big['largest_launch']} pilots each.")
    goals = [
        (f"cycle <= 60 s at {big['pilots']} pilots (median of {len(cs)})", big["median_s"] <= 60,
         f"{big['median_s']:.1f} s"),
        ("peak RSS of a factory process <= 2 GiB", big["peak_rss"] <= 2 * GIB,
         f"{big['peak_rss'] / 2**20:.0f} MiB"),
        ("0 duplicates under listing lag", big["duplicates"] == 0, f"{big['duplicates']}"),
        ("the lag was exercised (a cycle began with unlisted pilots)", lagged > 0, f"{lagged}"),
    ]
    for what, ok, figure in goals:
        print(f"  {verdict(ok)}  {what}: {figure}")
    correct = all(r["duplicates"] == 0 and r["short"] == 0
                  and all(c["left_after_terminate"] == 0 for c in r["cycles"]) for r in runs)
    print("every entry holds its level, no more, and every reaped pilot is gone" if correct else
          "DUPLICATES, SHORT ENTRIES OR PILOTS LEFT AFTER TERMINATION")
    return 0 if correct else 1


if __name__ == "__main__":
    sys.exit(main())
