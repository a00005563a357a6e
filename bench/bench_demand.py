"""Demand engine benchmark: plan a million idle jobs, with the goals printed next to the figures.

    python bench/bench_demand.py                # 1,000,000 jobs, 500 shapes, 200 entries (files in bench/out/)
    python bench/bench_demand.py --jobs 20000 --shapes 50 --entries 20 --out /tmp/b   # a small run

Measures, on the same generated input (deterministic: a fixed seed):
1. ``python -m airflow_glidein plan CONFIG --queue queue.json`` on a condor_q -json file of N idle
   jobs: wall time and peak memory of the whole process (interpreter start and imports included),
   and the engine's own phases measured in a child process;
2. the same demand as ``condor_q -autocluster -json`` output (one ad per shape);
3. matching a 10,000-job sample per job (every job against every entry, the whole expression, as
   a frontend that does not group would) against grouping it and matching per group.

glideinWMS's own countMatch (frontend/glideinFrontendLib.py) on the same kind of input, measured on a
2-core machine of this kind: 13-14 s wall, 1.0 GB peak.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SEED = 20240601
NOW = 1_764_000_000  # the generated queue's "now": QDates spread over the 2 hours before it
MATCH_EXPR = "stringListMember(glidein.GLIDEIN_Site, job.DESIRED_Sites) && job.RequestCpus <= glidein.Cpus"

GOALS = {
    "plan_wall": 30.0, "plan_peak_gib": 2.0,  # the floor
    "glideinwms_wall": 13.5, "glideinwms_peak_gib": 1.0,  # what we must beat clearly
    "autocluster_wall": 1.0,
    "ratio": 100.0,
}


# ---- input --------------------------------------------------------------------------------------

def shapes(n_shapes: int, n_entries: int, seed: int = SEED) -> list[dict]:
    """Job shapes: DESIRED_Sites lists (a fifth as many as shapes) x resource requests x owners."""
    rnd = random.Random(seed)
    site_lists = []
    for _ in range(max(n_shapes // 5, 1)):
        k = rnd.choice((1, 1, 2, 3, 5))
        site_lists.append(",".join(f"SITE_{i:03d}" for i in sorted(rnd.sample(range(n_entries), min(k, n_entries)))))
    out, seen = [], set()
    while len(out) < n_shapes:
        shape = {
            "DESIRED_Sites": rnd.choice(site_lists),
            "RequestCpus": rnd.choice((1, 1, 1, 2, 4, 8)),
            "RequestMemory": rnd.choice((1000, 2000, 2000, 4000, 8000)),
            "Owner": f"user{rnd.randrange(20):02d}",
        }
        key = tuple(shape.values())
        if key not in seen:
            seen.add(key)
            out.append(shape)
    return out


def write_queue(path: Path, n_jobs: int, job_shapes: list[dict], seed: int = SEED) -> None:
    """condor_q -json layout: one attribute per line, ads separated by a lone comma."""
    rnd = random.Random(seed + 1)
    templates = []
    for s in job_shapes:
        templates.append(
            "{\n"
            '  "ClusterId": %d,\n  "ProcId": %d,\n  "JobStatus": 1,\n  "QDate": %d,\n'
            f'  "Owner": "{s["Owner"]}",\n  "RequestCpus": {s["RequestCpus"]},\n'
            f'  "RequestMemory": {s["RequestMemory"]},\n  "RequestDisk": 2000000,\n'
            f'  "DESIRED_Sites": "{s["DESIRED_Sites"]}",\n  "JobUniverse": 5,\n'
            '  "Cmd": "/srv/job/run.sh"\n}'
        )
    with open(path, "w") as fh:
        fh.write("[\n")
        for i in range(n_jobs):
            if i:
                fh.write("\n,\n")
            fh.write(templates[rnd.randrange(len(templates))] % (1000 + i // 1000, i % 1000, NOW - rnd.randrange(7200)))
        fh.write("\n]\n")


def write_autoclusters(path: Path, queue: Path) -> None:
    """The same demand as condor_q -autocluster -json: one ad per distinct shape with its JobCount."""
    counts: dict[tuple, int] = {}
    keys = ("RequestCpus", "RequestMemory", "DESIRED_Sites", "Owner")
    with open(queue, "rb") as fh:
        import msgspec

        ad_type = msgspec.defstruct("Ad", [(k, object, None) for k in keys])
        for ad in msgspec.json.decode(fh.read(), type=list[ad_type]):
            key = tuple(getattr(ad, k) for k in keys)
            counts[key] = counts.get(key, 0) + 1
    ads = [{"AutoClusterId": i, "JobCount": n, **dict(zip(keys, key)), "JobUniverse": 5}
           for i, (key, n) in enumerate(sorted(counts.items()), start=1)]
    path.write_text(json.dumps(ads, indent=1))


def write_config(path: Path, n_entries: int, queue: Path) -> None:
    import yaml

    entries = []
    for i in range(n_entries):
        cores = (1, 4, 8, 16)[i % 4]
        e = {"name": f"entry-{i:03d}", "middleware": "ec2", "region": f"region-{i % 10}", "image": "ami-1",
             "flavor": f"flavor-{cores}", "cores": cores, "memory_mb": cores * 4096, "gpus": 2 if i % 20 == 0 else 0,
             "attrs": {"GLIDEIN_Site": f"SITE_{i:03d}"}, "trust_domain": "bench",
             "limits": {"max_pilots": 1000, "max_idle": 200, "max_per_cycle": 50}}
        if i % 2:
            e["requirements"] = "TARGET.RequestMemory <= MY.Memory"
        entries.append(e)
    cfg = {
        "factory": {"name": "bench", "bootstrap_url": "http://127.0.0.1:8080/glidein"},
        "entries": entries,
        "frontends": [{"name": "bench", "demand": {"queue_file": str(queue)}, "match_expr": MATCH_EXPR,
                       "entries": [e["name"] for e in entries], "credentials": ["key", "token"],
                       "limits": {"max_idle": 100000, "max_running": 1000000, "max_idle_per_entry": 10000}}],
        "credentials": [
            {"id": "key", "type": "ec2_key_pair", "conn_id": "bench_aws", "trust_domain": "bench", "purpose": "provision"},
            {"id": "token", "type": "idtoken", "conn_id": "bench_token", "trust_domain": "bench", "purpose": "pilot"},
        ],
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def generate(out: Path, n_jobs: int, n_shapes: int, n_entries: int) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    tag = f"{n_jobs}j_{n_shapes}s_{n_entries}e"
    paths = {"queue": out / f"queue_{tag}.json", "autocluster": out / f"autocluster_{tag}.json",
             "config": out / f"glidein_{tag}.yaml", "config_ac": out / f"glidein_{tag}_ac.yaml"}
    if not paths["queue"].exists():
        t = time.monotonic()
        tmp = paths["queue"].with_suffix(".tmp")
        write_queue(tmp, n_jobs, shapes(n_shapes, n_entries))
        tmp.rename(paths["queue"])
        print(f"generated {paths['queue']} ({paths['queue'].stat().st_size / 1e6:.0f} MB) in {time.monotonic() - t:.1f} s")
    if not paths["autocluster"].exists():
        write_autoclusters(paths["autocluster"], paths["queue"])
    write_config(paths["config"], n_entries, paths["queue"])
    write_config(paths["config_ac"], n_entries, paths["autocluster"])
    return paths


# ---- measurements -------------------------------------------------------------------------------

def run_measured(argv: list[str]) -> tuple[float, float, str]:
    """Wall seconds and peak RSS (GiB) of a child process, and its output."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO)
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{out[-3000:]}")
    return wall, usage.ru_maxrss / 1024 / 1024, out


def phases(config: str, queue: str) -> dict:
    """The engine's phases, in this process: read+group, match, plan (seconds)."""
    from airflow_glidein import credentials, demand, planning
    from airflow_glidein.config import load_config

    cfg = load_config(config)
    fe = cfg.frontends[0]
    t0 = time.perf_counter()
    attrs = demand.match_attributes(fe.match_expr, [cfg.entry(e) for e in fe.entries])
    groups = demand.read_queue_file(queue, attrs, NOW)
    t1 = time.perf_counter()
    matcher = demand.matcher_for(cfg, fe.name)
    demand.match_groups(groups, matcher)
    t2 = time.perf_counter()
    request = planning.plan_frontend(cfg, fe.name, groups, credentials.select(cfg, fe.name))
    t3 = time.perf_counter()
    return {"read_group": t1 - t0, "match": t2 - t1, "plan": t3 - t2, "total": t3 - t0, "groups": len(groups),
            "idle": sum(g.idle for g in groups), "evaluations": matcher.evaluations,
            "levels": {e: p["idle"] for e, p in request["entries"].items()}}


def sample_jobs(queue: Path, n: int) -> list[dict]:
    """The first n job ads of the queue file, as a frontend would hold them (matching attributes only)."""
    keep = ("DESIRED_Sites", "RequestCpus", "RequestMemory", "RequestGPUs", "JobStatus", "QDate")
    jobs, buf = [], b""
    with open(queue, "rb") as fh:
        while len(jobs) < n:
            data = fh.read(1 << 20)
            if not data:
                break
            buf += data
            parts = buf.split(b"\n,\n")
            buf = parts.pop()
            for p in parts:
                ad = json.loads(p.lstrip(b"[\n"))
                jobs.append({k: ad[k] for k in keep if k in ad})
    return jobs[:n]


def per_job_match(match_expr: str, entries: dict, jobs: list[dict]) -> list[list[str]]:
    """Every job against every entry, the whole expression and the entry's requirements: no grouping, no memo."""
    import classad2

    from airflow_glidein import classads

    expr = classads.parse_expr(match_expr)
    glideins = []
    for name, (attrs, req) in entries.items():
        g = classads.to_ad(attrs)
        if req:
            g["Requirements"] = classads.parse_expr(req)
        glideins.append((name, g, bool(req), (attrs["Cpus"], attrs["Memory"], attrs["GPUs"])))
    out = []
    for job in jobs:
        job_ad = classads.to_ad(job)
        scope = classad2.ClassAd()
        scope["job"] = job_ad
        cpus, mem, gpus = classads.job_size(job)
        matched = []
        for name, g, has_req, (c, m, gp) in glideins:
            if cpus > c or mem > m or gpus > gp:
                continue
            scope["glidein"] = g
            if classads.is_true(expr.eval(scope)) and (not has_req or job_ad.matches(g)):
                matched.append(name)
        out.append(matched)
    return out


def ratio(config: str, queue: Path, n: int, repeat: int = 5) -> dict:
    """Per job once (seconds: its own noise averages out) against per group, the median of ``repeat`` runs.

    CPU time of this process (time.process_time), not wall: the machine is shared, and a short
    measurement's wall time is at the mercy of whoever else runs at that moment.
    """
    import statistics

    from airflow_glidein import demand
    from airflow_glidein.config import load_config

    cfg = load_config(config)
    fe = cfg.frontends[0]
    jobs = sample_jobs(queue, n)
    entries = {e: (cfg.entry(e).machine_attrs(), cfg.entry(e).requirements) for e in fe.entries}
    t0 = time.process_time()
    slow = per_job_match(fe.match_expr, entries, jobs)
    per_job = time.process_time() - t0
    attrs = demand.match_attributes(fe.match_expr, [cfg.entry(e) for e in fe.entries])
    grouped, matched = [], []
    for _ in range(repeat):
        t0 = time.process_time()
        groups = demand.group_jobs(jobs, attrs, NOW)
        t1 = time.process_time()
        matcher = demand.matcher_for(cfg, fe.name)
        demand.match_groups(groups, matcher)
        t2 = time.process_time()
        grouped.append(t2 - t0)
        matched.append(t2 - t1)
    # the two must agree: the matched entries of every job are those of its group
    by_group = {tuple(g.attrs.get(a) for a in attrs): g.entries for g in groups}
    agree = all(by_group[tuple(j.get(a) for a in attrs)] == m for j, m in zip(jobs, slow))
    per_group, match_only = statistics.median(grouped), statistics.median(matched)
    return {"jobs": len(jobs), "groups": len(groups), "per_job": per_job, "per_group": per_group,
            "match_only": match_only, "ratio": per_job / per_group, "ratio_match_only": per_job / match_only,
            "agree": agree, "evaluations": matcher.evaluations}


# ---- report -------------------------------------------------------------------------------------

def run(out: Path, n_jobs: int, n_shapes: int, n_entries: int, sample: int) -> dict:
    py = sys.executable
    # generate in a child: a forked child's peak memory counts its parent's, so this process stays small
    subprocess.run([py, __file__, "_generate", str(out), str(n_jobs), str(n_shapes), str(n_entries)], check=True)
    paths = generate(out, n_jobs, n_shapes, n_entries)
    cli = [py, "-m", "airflow_glidein", "plan", str(paths["config"]), "--queue", str(paths["queue"]), "--json"]
    wall, peak, _ = run_measured(cli)
    jobs_ph = json.loads(run_measured([py, __file__, "_phases", str(paths["config"]), str(paths["queue"])])[2])
    cli_ac = [py, "-m", "airflow_glidein", "plan", str(paths["config_ac"]), "--queue", str(paths["autocluster"]), "--json"]
    ac_wall, ac_peak, _ = run_measured(cli_ac)
    ac_ph = json.loads(run_measured([py, __file__, "_phases", str(paths["config_ac"]), str(paths["autocluster"])])[2])
    r = ratio(str(paths["config"]), paths["queue"], sample)
    return {"paths": {k: str(v) for k, v in paths.items()}, "queue_mb": paths["queue"].stat().st_size / 1e6,
            "plan": {"wall": wall, "peak_gib": peak, **jobs_ph},
            "autocluster": {"wall": ac_wall, "peak_gib": ac_peak, **ac_ph}, "ratio": r}


def report(res: dict, n_jobs: int, n_shapes: int, n_entries: int) -> str:
    p, a, r = res["plan"], res["autocluster"], res["ratio"]
    ok = lambda good: "OK " if good else "MISS"  # noqa: E731
    lines = [
        f"Demand benchmark: {n_jobs:,} idle jobs in {n_shapes} shapes ({res['queue_mb']:.0f} MB condor_q -json), "
        f"{n_entries} entries, {os.cpu_count()} cores",
        "",
        f"(1) plan from condor_q -json, whole process   {p['wall']:6.2f} s  {p['peak_gib']:5.2f} GiB peak   "
        f"goal <= {GOALS['plan_wall']:.0f} s, <= {GOALS['plan_peak_gib']:.0f} GiB   "
        f"[{ok(p['wall'] <= GOALS['plan_wall'] and p['peak_gib'] <= GOALS['plan_peak_gib'])}]",
        f"    glideinWMS countMatch, same input:  {GOALS['glideinwms_wall']:6.2f} s  "
        f"{GOALS['glideinwms_peak_gib']:5.2f} GiB peak   -> ours {GOALS['glideinwms_wall'] / p['wall']:.1f}x faster, "
        f"{GOALS['glideinwms_peak_gib'] / p['peak_gib']:.1f}x less memory",
        f"    engine phases: read+group {p['read_group']:.2f} s, match {p['match']:.2f} s "
        f"({p['evaluations']:,} (job values, entry) evaluations for {p['groups']} groups x {n_entries} entries), "
        f"plan {p['plan']:.3f} s; {p['idle']:,} idle jobs",
        f"(2) plan from condor_q -autocluster -json      {a['wall']:6.2f} s whole process, "
        f"{a['total']:.3f} s in the engine   goal <= {GOALS['autocluster_wall']:.0f} s   "
        f"[{ok(a['total'] <= GOALS['autocluster_wall'])}]",
        f"    same levels as (1): {a['levels'] == p['levels']}",
        f"(3) match {r['jobs']:,} jobs (CPU time): per job {r['per_job']:.2f} s; grouped ({r['groups']} groups) "
        f"{r['per_group'] * 1000:.1f} ms with grouping -> {r['ratio']:.0f}x   goal >= {GOALS['ratio']:.0f}x   "
        f"[{ok(r['ratio'] >= GOALS['ratio'])}]",
        f"    matching alone {r['match_only'] * 1000:.1f} ms ({r['evaluations']:,} entry evaluations) -> "
        f"{r['ratio_match_only']:.0f}x; every job's entries equal its group's: {r['agree']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_generate":
        generate(Path(argv[1]), int(argv[2]), int(argv[3]), int(argv[4]))
        return 0
    if argv and argv[0] == "_phases":
        print(json.dumps(phases(argv[1], argv[2])))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=1_000_000)
    ap.add_argument("--shapes", type=int, default=500)
    ap.add_argument("--entries", type=int, default=200)
    ap.add_argument("--sample", type=int, default=10_000)
    ap.add_argument("--out", type=Path, default=HERE / "out")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = ap.parse_args(argv)
    res = run(args.out, args.jobs, args.shapes, args.entries, args.sample)
    print(report(res, args.jobs, args.shapes, args.entries))
    if args.json:
        print(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
