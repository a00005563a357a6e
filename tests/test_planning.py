"""Planning formulas on hand-worked cases: every number below is worked out in the comment above it."""

from __future__ import annotations

from typing import Any

import pytest

from airflow_glidein import pilots as P
from airflow_glidein import planning, provisioning
from airflow_glidein.config import parse_config
from airflow_glidein.demand import JobGroup

NO_CURBS = {"curb_idle_per_entry": 10**6, "curb_idle": 10**6, "curb_running": 10**6}


def entry(name: str, cores: int = 4, memory: int = 8192, gpus: int = 0, **limits: Any) -> dict:
    return {"name": name, "middleware": "ec2", "region": "us-east-1", "image": "ami-1", "flavor": "f", "cores": cores,
            "memory_mb": memory, "gpus": gpus, "trust_domain": "aws", "limits": limits or {}}


def config(entries: list[dict], limits: dict | None = None, frontends: list[str] = ("fe",), factory: dict | None = None):
    return parse_config({
        "factory": {"name": "f", "bootstrap_url": "https://x", "limits": factory or {}},
        "entries": entries,
        "frontends": [{"name": n, "demand": {"queue_file": "q.json"}, "entries": [e["name"] for e in entries],
                       "credentials": ["k", "t"], "limits": limits or {}} for n in frontends],
        "credentials": [{"id": "k", "type": "ec2_key_pair", "conn_id": "c", "trust_domain": "aws",
                         "purpose": "provision"},
                        {"id": "t", "type": "idtoken", "conn_id": "t", "trust_domain": "aws", "purpose": "pilot"}],
    })


def group(idle: int, entries: list[str], cpus: int = 1, memory: int = 2000, gpus: int = 0, old: int | None = None,
          running: int = 0) -> JobGroup:
    return JobGroup({"RequestCpus": cpus}, idle, running, idle if old is None else old, entries, (cpus, memory, gpus))


def plan(cfg, groups, pilots=None, frontend="fe") -> dict[str, dict]:
    creds = {e: {"provision": "k", "pilot": "t"} for e in cfg.frontend(frontend).entries}
    return planning.plan_frontend(cfg, frontend, groups, creds, pilots)["entries"]


def test_fractional_counting_across_overlapping_entries():
    cfg = config([entry("A"), entry("B")], NO_CURBS)
    # 30 jobs want A only; 24 want A or B: each counts 1/2 toward both.
    # A: 30 + 12 = 42 one-core jobs / 4 per pilot = 10.5 -> 11; B: 12 / 4 = 3.
    p = plan(cfg, [group(30, ["A"]), group(24, ["A", "B"])])
    assert (p["A"]["idle"], p["B"]["idle"]) == (11, 3)
    assert p["A"]["why"]["idle_jobs"] == 42 and p["B"]["why"]["idle_jobs"] == 12
    assert p["A"]["why"]["bound_by"] == "demand (cores)"


def test_each_group_counts_its_own_cores():
    cfg = config([entry("E8", cores=8, memory=32768), entry("E1", cores=1, memory=4096)], NO_CURBS)
    # 64 one-core jobs match both (32 each); 10 four-core jobs match E8 only.
    # E8: 32 one-core jobs / 8 per pilot = 4, plus 10 four-core jobs / 2 per pilot = 5 -> 9 pilots.
    # (glideinWMS scales E8's average cores per job: (64x1 + 10x4) / 74 = 1.41 cores x 42 fractional jobs
    #  = 59 cores / 8 = 7.4 -> 8 pilots, one short: the four-core jobs are under-asked.)
    p = plan(cfg, [group(64, ["E8", "E1"]), group(10, ["E8"], cpus=4)])
    assert p["E8"]["idle"] == 9
    assert p["E1"]["idle"] == 32  # 32 one-core jobs, one per one-core pilot


def test_jobs_are_packed_whole_into_pilots():
    cfg = config([entry("A", cores=4, memory=8192)], NO_CURBS)
    # five 3-core jobs: one per 4-core pilot -> 5 pilots (15 cores / 4 would say 4)
    assert plan(cfg, [group(5, ["A"], cpus=3)])["A"]["idle"] == 5
    # 1-core 6000 MB jobs: memory allows one per 8192 MB pilot -> 7 jobs, 7 pilots, bound by memory
    p = plan(cfg, [group(7, ["A"], memory=6000)])["A"]
    assert p["idle"] == 7 and p["why"]["bound_by"] == "demand (memory_mb)"


def test_gpus_decide_for_gpu_jobs():
    cfg = config([entry("G", cores=16, memory=65536, gpus=2)], NO_CURBS)
    # 5 one-GPU jobs, 2 per pilot by GPUs (16 by cores) -> 2.5 -> 3
    p = plan(cfg, [group(5, ["G"], gpus=1)])["G"]
    assert p["idle"] == 3 and p["why"]["bound_by"] == "demand (gpus)"


def test_pilots_already_booting_or_idle_count_first():
    cfg = config([entry("A")], NO_CURBS)
    # 40 one-core jobs -> 10 pilots wanted; 4 booting + 2 idle are there: 4 more; level 6 + 4 = 10
    p = plan(cfg, [group(40, ["A"])], {"A": {"booting": 4, "idle": 2, "busy": 3, "total": 9}})["A"]
    assert (p["why"]["wanted"], p["why"]["add"], p["idle"]) == (10, 4, 10)
    # max running = (wanted 10 + busy 3) x 1.15 + 1 = 15.95 -> 15
    assert p["max_running"] == 15
    # more pilots than wanted: add nothing; the level says what is wanted
    p = plan(cfg, [group(8, ["A"])], {"A": {"booting": 5, "idle": 0, "busy": 0, "total": 5}})["A"]
    assert (p["why"]["add"], p["idle"]) == (0, 2)


def test_limit_max_idle_per_entry_binds():
    cfg = config([entry("A")], {**NO_CURBS, "max_idle_per_entry": 6})
    # 10 wanted, 2 booting: room under max_idle_per_entry is 6 - 2 = 4 -> level 6
    p = plan(cfg, [group(40, ["A"])], {"A": {"booting": 2, "idle": 0, "busy": 0, "total": 2}})["A"]
    assert (p["why"]["add"], p["idle"], p["why"]["bound_by"]) == (4, 6, "frontend.max_idle_per_entry")


def test_limit_max_running_per_entry_binds():
    cfg = config([entry("A")], {**NO_CURBS, "max_running_per_entry": 12})
    # 10 wanted, 9 busy: 12 - 9 = 3 more may exist -> level 3; max running capped at 12
    p = plan(cfg, [group(40, ["A"])], {"A": {"booting": 0, "idle": 0, "busy": 9, "total": 9}})["A"]
    assert (p["idle"], p["max_running"], p["why"]["bound_by"]) == (3, 12, "frontend.max_running_per_entry")


def test_hard_stop_when_a_limit_is_reached():
    cfg = config([entry("A")], {**NO_CURBS, "max_idle_per_entry": 5})
    # 5 booting already = max_idle_per_entry: nothing is added, not even the "at least one"
    p = plan(cfg, [group(400, ["A"])], {"A": {"booting": 5, "idle": 0, "busy": 0, "total": 5}})["A"]
    assert (p["why"]["add"], p["idle"], p["why"]["bound_by"]) == (0, 5, "frontend.max_idle_per_entry")


def test_frontend_max_idle_is_shared_in_proportion():
    cfg = config([entry("A"), entry("B")], {**NO_CURBS, "max_idle": 10})
    # A wants 12, B wants 3 (sum 15 > 10): 10 split 12:3 -> 8 and 2
    p = plan(cfg, [group(48, ["A"]), group(12, ["B"])])
    assert (p["A"]["idle"], p["B"]["idle"]) == (8, 2)
    assert p["A"]["why"]["bound_by"] == p["B"]["why"]["bound_by"] == "frontend.max_idle"


def test_frontend_max_running_counts_busy_pilots_everywhere():
    cfg = config([entry("A"), entry("B")], {**NO_CURBS, "max_running": 20})
    # 16 busy at B: 4 more pilots may exist; A wants 12 -> 4
    p = plan(cfg, [group(48, ["A"])], {"B": {"booting": 0, "idle": 0, "busy": 16, "total": 16}})
    assert p["A"]["idle"] == 4 and p["A"]["why"]["bound_by"] == "frontend.max_running"


def test_curbs_halve_what_is_added_each():
    cfg = config([entry("A"), entry("B")], {"curb_idle_per_entry": 5, "curb_idle": 8, "curb_running": 10**6})
    pilots = {"A": {"booting": 6, "idle": 0, "busy": 0, "total": 6}, "B": {"booting": 2, "idle": 0, "busy": 0, "total": 2}}
    p = plan(cfg, [group(80, ["A"]), group(40, ["B"])], pilots)
    # A: 20 wanted - 6 there = 14; A has 6 >= 5 (entry curb) and the frontend 8 >= 8 (curb_idle): 14 / 4 = 3.5 -> 3
    assert (p["A"]["why"]["add"], p["A"]["idle"], p["A"]["why"]["bound_by"]) == (3, 9, "curbs")
    assert len(p["A"]["why"]["curbs"]) == 2
    # B: 10 - 2 = 8; only the frontend curb: 8 / 2 = 4
    assert (p["B"]["why"]["add"], p["B"]["idle"], p["B"]["why"]["bound_by"]) == (4, 6, "curb_idle")
    # a curb never takes the last one: 1 missing, halved to 0.5 -> at least 1
    p = plan(cfg, [group(28, ["A"])], pilots)
    assert p["A"]["why"]["add"] == 1


def test_ramp_up_and_reserve():
    cfg = config([entry("A")], {**NO_CURBS, "ramp_up_attenuation": 3, "reserve_idle": 5})
    # 30 pilots missing, none idle 10 min: 30 / 3 = 10
    assert plan(cfg, [group(120, ["A"], old=0)])["A"]["idle"] == 10
    # all of them old: 10 + min(30 // 3, reserve 5) = 15
    assert plan(cfg, [group(120, ["A"])])["A"]["idle"] == 15
    # with no attenuation the reserve never asks beyond demand: 30
    cfg = config([entry("A")], NO_CURBS)
    assert plan(cfg, [group(120, ["A"])])["A"]["idle"] == 30


def test_no_demand_no_request():
    cfg = config([entry("A")])
    p = plan(cfg, [], {"A": {"booting": 0, "idle": 0, "busy": 4, "total": 4}})["A"]
    assert (p["idle"], p["max_running"]) == (0, 4)  # keep what runs, ask for nothing


# ---- the factory: two frontends sharing an entry, with entry and global caps ---------------------

def pilot(i: int, entry: str, frontend: str, state: str, launched: float = 0.0) -> P.Pilot:
    return P.Pilot(f"i-{entry}-{frontend}-{i}", entry, frontend, "l", state, launched, P.P_RUNNING)


def request(levels: dict[str, int], max_running: int = 1000) -> dict:
    return {"entries": {e: {"idle": n, "max_running": max_running, "provision": "k", "pilot": "t"}
                        for e, n in levels.items()}}


def launched(work) -> dict[tuple[str, str], int]:
    out: dict = {}
    for item in work:
        for b in item["launches"]:
            out[(item["entry"], b["frontend"])] = out.get((item["entry"], b["frontend"]), 0) + b["count"]
    return out


def test_factory_global_caps_across_two_frontends_sharing_an_entry():
    cfg = config([entry("A", max_pilots=50, max_idle=30, max_per_cycle=100),
                  entry("B", max_pilots=50, max_idle=30, max_per_cycle=100)],
                 frontends=["cms", "atlas"], factory={"max_pilots": 40, "max_idle": 20})
    existing = ([pilot(i, "A", "cms", P.BUSY) for i in range(10)]
                + [pilot(i, "A", "atlas", P.BOOTING) for i in range(4)]
                + [pilot(i, "B", "cms", P.IDLE) for i in range(2)])
    requests = {"cms": request({"A": 12, "B": 6}), "atlas": request({"A": 20})}
    work = provisioning.plan_launches(cfg, requests, existing, "k")
    # Global: 16 live of max 40 -> 24; 6 booting/idle of max 20 -> 14 left: the factory may add 14 in all.
    # Entry A first: cms deficit 12 - 0 = 12, atlas 20 - 4 = 16 -> 28 wanted; entry room min(50-14, 30-4) = 26,
    #   global 14 binds: 14 split 12:16 -> 6 and 8.
    # Entry B: cms 6 - 2 = 4 wanted; global room is used up -> 0.
    assert launched(work) == {("A", "cms"): 6, ("A", "atlas"): 8}
    a, b = (next(w for w in work if w["entry"] == e) for e in ("A", "B"))
    assert a["why"]["bound_by"] == "factory.limits" and a["why"]["room"] == 14
    assert b["why"]["bound_by"] == "factory.limits" and b["launches"] == []


def test_factory_entry_limit_across_frontends_and_their_max_running():
    cfg = config([entry("A", max_pilots=12, max_idle=10, max_per_cycle=100)], frontends=["cms", "atlas"])
    existing = [pilot(i, "A", "cms", P.BUSY) for i in range(5)]
    # cms asks 10 idle but max_running 8: 8 - 5 live = 3; atlas asks 10.
    requests = {"cms": {**request({"A": 10}, max_running=8), "start_expr": "cms_start"}, "atlas": request({"A": 10})}
    work = provisioning.plan_launches(cfg, requests, existing, "k")
    # Entry room: max_pilots 12 - 5 live = 7 (max_idle 10 - 0 = 10): 7 split 3:10 -> 2 and 5.
    assert launched(work) == {("A", "cms"): 2, ("A", "atlas"): 5}
    assert work[0]["why"]["bound_by"] == "entry.max_pilots"
    # each frontend's start_expr goes with its launches: it becomes those pilots' START
    assert {b["frontend"]: b["start_expr"] for b in work[0]["launches"]} == {"cms": "cms_start", "atlas": "true"}
    assert work[0]["why"]["frontends"]["cms"]["deficit"] == 3


@pytest.mark.parametrize("weights, total, expected", [
    ({"a": 12, "b": 16}, 14, {"a": 6, "b": 8}),
    ({"a": 1, "b": 1, "c": 1}, 2, {"a": 1, "b": 1, "c": 0}),  # ties by name
    ({"a": 0, "b": 0}, 5, {"a": 0, "b": 0}),
])
def test_apportion(weights, total, expected):
    assert planning.apportion(total, weights) == expected


def test_factory_counts_no_capacity_in_pilots_about_to_expire():
    """glideinWMS #554: slots about to expire counted as idle capacity and blocked new requests."""
    cfg = config([entry("A", max_pilots=50, max_idle=30, max_per_cycle=100)])
    policy = cfg.entry("A").policy  # max_lifetime 86400, min_idle_lifetime 1800
    now = 1_000_000.0
    fresh = [pilot(i, "A", "fe", P.IDLE, launched=now - 600) for i in range(3)]
    # 1200 s of life left, less than the 1800 s min_idle_lifetime: not what the frontend counts on
    old = [pilot(10 + i, "A", "fe", P.IDLE, launched=now - policy.max_lifetime + 1200) for i in range(4)]
    work = provisioning.plan_launches(cfg, {"fe": request({"A": 8})}, fresh + old, "k", now=now)
    # level 8 - 3 usable idle pilots = 5 (without the rule: 8 - 7 = 1)
    assert launched(work) == {("A", "fe"): 5}
    assert work[0]["why"]["frontends"]["fe"]["capacity"] == 3
    # without a clock (older callers) nothing changes
    assert launched(provisioning.plan_launches(cfg, {"fe": request({"A": 8})}, fresh + old, "k")) == {("A", "fe"): 1}


def test_factory_request_without_max_running():
    # int(math.inf) used to raise OverflowError for a request that names no max_running
    cfg = config([entry("A", max_pilots=50, max_idle=30, max_per_cycle=100)])
    req = {"entries": {"A": {"idle": 4, "provision": "k", "pilot": "t"}}}
    assert launched(provisioning.plan_launches(cfg, {"fe": req}, [], "k")) == {("A", "fe"): 4}


def test_factory_max_per_cycle_binds_and_batches():
    cfg = config([entry("A", max_pilots=100, max_idle=100, max_per_cycle=7, batch_size=3)], frontends=["cms", "atlas"])
    work = provisioning.plan_launches(cfg, {"cms": request({"A": 10}), "atlas": request({"A": 4})}, [], "k")
    # 14 wanted, 7 per cycle: split 10:4 -> 5 and 2; batches of at most 3 per launch id
    assert launched(work) == {("A", "cms"): 5, ("A", "atlas"): 2}
    assert work[0]["why"]["bound_by"] == "entry.max_per_cycle"
    assert sorted((b["frontend"], b["count"]) for b in work[0]["launches"]) == [("atlas", 2), ("cms", 2), ("cms", 3)]
    assert len({b["launch_id"] for b in work[0]["launches"]}) == 3


def test_prices_split_shared_demand_by_figure_of_merit():
    """HEPCloud's Decision Engine: FOM = price per core-hour x (pilots + 1) / max_pilots; a job group
    matching several entries is split in proportion to 1 / FOM (glideinWMS splits it equally)."""
    cheap, dear = entry("cheap", max_pilots=100), entry("dear", max_pilots=100)
    cheap["price"], dear["price"] = 1.0, 3.0
    cfg = config([cheap, dear], NO_CURBS)
    jobs = [group(100, ["cheap", "dear"])]
    # empty: FOM 1 x 1/100 = 0.01 and 3 x 1/100 = 0.03 -> weights 100 : 33.3 -> 75 and 25 jobs
    # -> 75/4 = 18.75 -> 19 pilots and 25/4 = 6.25 -> 7
    p = plan(cfg, jobs)
    assert (p["cheap"]["why"]["idle_jobs"], p["dear"]["why"]["idle_jobs"]) == (75, 25)
    assert (p["cheap"]["idle"], p["dear"]["idle"]) == (19, 7)
    assert (p["cheap"]["why"]["fom"], p["dear"]["why"]["fom"]) == (0.01, 0.03)
    # the cheap entry already holds 59 pilots: FOM 1 x 60/100 = 0.6 vs 0.03 -> weights 1.667 : 33.3
    # -> cheap 100 x 1.667/35 = 4.76 jobs, dear 95.24 jobs -> 24 pilots at dear
    busy = {"cheap": {"busy": 59, "total": 59}}
    p = plan(cfg, jobs, busy)
    assert p["cheap"]["why"]["idle_jobs"] == pytest.approx(4.762, abs=1e-3)
    assert p["dear"]["idle"] == 24
    # full (100 of max 100): no share at all; everything goes to the other
    p = plan(cfg, jobs, {"cheap": {"busy": 100, "total": 100}})
    assert p["cheap"]["why"]["idle_jobs"] == 0 and p["cheap"]["why"]["fom"] == "full"
    assert p["dear"]["why"]["idle_jobs"] == 100
    # a free entry (price 0, e.g. an owned OpenStack) is filled first
    cheap["price"] = 0
    p = plan(config([cheap, dear], NO_CURBS), jobs)
    assert (p["cheap"]["why"]["idle_jobs"], p["dear"]["why"]["idle_jobs"]) == (100, 0)
    # jobs matching one entry only go there whatever it costs
    p = plan(cfg, [group(8, ["dear"])])
    assert p["dear"]["why"]["idle_jobs"] == 8


def test_without_prices_shares_are_equal_and_an_unpriced_entry_counts_as_the_dearest():
    a, b, c = entry("a"), entry("b"), entry("c")
    p = plan(config([a, b, c], NO_CURBS), [group(90, ["a", "b", "c"])])
    assert [p[e]["why"]["idle_jobs"] for e in "abc"] == [30, 30, 30] and "fom" not in p["a"]["why"]
    a["price"], b["price"] = 1.0, 2.0  # c has none: counted at 2.0
    cfg = config([a, b, c], NO_CURBS)
    p = plan(cfg, [group(100, ["a", "b", "c"])])
    assert [p[e]["why"]["idle_jobs"] for e in "abc"] == [50, 25, 25]
    from airflow_glidein import report

    lines = report.plan_table(planning.plan_frontend(
        cfg, "fe", [group(100, ["a", "b", "c"])], {e: {"provision": "k", "pilot": "t"} for e in "abc"})).splitlines()
    assert lines[1].split()[:4] == ["entry", "idle", "jobs", "cores"] and "fom" in lines[1].split()
    assert lines[3].split()[:4] == ["a", "50.0", "50.0", "0.01"]


def test_factory_launches_within_the_provider_quota_shared_by_its_entries():
    cfg = config([entry("A", cores=4, memory=8192), entry("B", cores=8, memory=16384)], NO_CURBS)
    req = {"fe": request({"A": 10, "B": 10})}
    # one project holds both entries: 12 instances and 40 cores left
    # A (config order first): 40 // 4 = 10 cores-wise, 12 instances -> 10 fit: all 10 launched
    # B: 2 instances and 0 cores left -> none, bound by the provider quota
    quotas = [{"entries": ["A", "B"], "headroom": {"instances": 12, "cores": 40}}]
    work = {w["entry"]: w for w in provisioning.plan_launches(cfg, req, [], "k", quotas=quotas)}
    assert sum(b["count"] for b in work["A"]["launches"]) == 10
    assert work["B"]["launches"] == [] and work["B"]["why"]["bound_by"].startswith("provider quota (instances 2, cores 0")
    # 48 cores: A takes 10 (40 cores), B gets 8 // 8 = 1
    quotas = [{"entries": ["A", "B"], "headroom": {"instances": 12, "cores": 48}}]
    work = {w["entry"]: w for w in provisioning.plan_launches(cfg, req, [], "k", quotas=quotas)}
    assert sum(b["count"] for b in work["B"]["launches"]) == 1
    # no quota known: only the entry limits and demand
    work = {w["entry"]: w for w in provisioning.plan_launches(cfg, req, [], "k")}
    assert [sum(b["count"] for b in work[e]["launches"]) for e in "AB"] == [10, 10]
