"""Matching with ClassAd expressions from HTCondor practice, evaluated by the real classad2."""

from __future__ import annotations

import itertools

import classad2
import pytest

from airflow_glidein import classads

SITES = "stringListMember(glidein.GLIDEIN_Site, job.DESIRED_Sites)"


def entries(**kw):
    """name -> (pilot attributes, requirements)."""
    base = {
        "east": ({"Cpus": 4, "Memory": 8192, "GPUs": 0, "GLIDEIN_Site": "AWS_EAST"}, None),
        "west": ({"Cpus": 8, "Memory": 32768, "GPUs": 0, "GLIDEIN_Site": "AWS_WEST"}, "TARGET.RequestMemory <= MY.Memory"),
        "gpu": ({"Cpus": 8, "Memory": 65536, "GPUs": 2, "GLIDEIN_Site": "GPU_SITE"}, None),
    }
    base.update(kw)
    return base


def naive(match_expr: str, ents: dict, job: dict) -> list[str]:
    """The match the slow way: the whole expression, once per entry, as glideinWMS does per group."""
    job_ad = classads.to_ad(job)
    scope = classad2.ClassAd()
    scope["job"] = job_ad
    out = []
    cpus, memory, gpus = classads.job_size(job)
    for name, (attrs, req) in ents.items():
        glidein = classads.to_ad(attrs)
        if req:
            glidein["Requirements"] = classad2.ExprTree(req)
        scope["glidein"] = glidein
        fits = cpus <= attrs["Cpus"] and memory <= attrs["Memory"] and gpus <= attrs["GPUs"]
        if fits and classads.is_true(classad2.ExprTree(match_expr).eval(scope)) and (not req or job_ad.matches(glidein)):
            out.append(name)
    return out


def test_desired_sites_string_list():
    m = classads.Matcher(SITES, entries())
    assert m.matches({"DESIRED_Sites": "AWS_EAST,AWS_WEST", "RequestCpus": 1, "RequestMemory": 2000}) == ["east", "west"]
    assert m.matches({"DESIRED_Sites": "AWS_WEST", "RequestCpus": 1, "RequestMemory": 2000}) == ["west"]
    # stringListMember splits on commas and spaces, as HTCondor does
    assert m.matches({"DESIRED_Sites": "GPU_SITE, AWS_EAST", "RequestCpus": 1}) == ["east", "gpu"]
    assert m.matches({"DESIRED_Sites": "T2_US_Nowhere", "RequestCpus": 1}) == []


def test_request_memory_against_entry_memory_two_way():
    m = classads.Matcher(SITES, entries())
    # 20 GB: the west entry's own requirements (TARGET.RequestMemory <= MY.Memory) admit it
    assert m.matches({"DESIRED_Sites": "AWS_WEST", "RequestMemory": 20000}) == ["west"]
    # 40 GB: does not fit in a 32 GB pilot
    assert m.matches({"DESIRED_Sites": "AWS_WEST", "RequestMemory": 40000}) == []
    # the size rule (multicore policy) holds without any requirements: 9 GB never fits east's 8 GB pilots
    assert m.matches({"DESIRED_Sites": "AWS_EAST", "RequestMemory": 9000}) == []
    assert m.matches({"DESIRED_Sites": "AWS_EAST", "RequestCpus": 5}) == []
    assert m.matches({"DESIRED_Sites": "GPU_SITE,AWS_EAST", "RequestGPUs": 1}) == ["gpu"]


def test_undefined_attributes():
    m = classads.Matcher(SITES, entries())
    # no DESIRED_Sites: stringListMember(x, undefined) is undefined, which is not a match
    assert m.matches({"RequestCpus": 1}) == []
    # entry requirements over an attribute the job lacks: undefined, no match
    ents = entries(west=({"Cpus": 8, "Memory": 32768, "GPUs": 0, "GLIDEIN_Site": "AWS_WEST"}, "TARGET.MaxWallTimeMins <= 600"))
    m = classads.Matcher(SITES, ents)
    assert m.matches({"DESIRED_Sites": "AWS_WEST"}) == []
    assert m.matches({"DESIRED_Sites": "AWS_WEST", "MaxWallTimeMins": 300}) == ["west"]
    # =?= treats undefined as a value: a job without the attribute matches an expression that allows it
    m = classads.Matcher("job.Owner =?= undefined || job.Owner == \"cms\"", entries())
    assert m.matches({"RequestCpus": 1, "RequestMemory": 1000}) == ["east", "west", "gpu"]
    # ... while west's own requirements (TARGET.RequestMemory <= MY.Memory) are undefined without RequestMemory
    assert m.matches({"RequestCpus": 1}) == ["east", "gpu"]
    assert m.matches({"Owner": "atlas", "RequestMemory": 1000}) == []
    # isUndefined with a default, the usual idiom
    m = classads.Matcher("ifThenElse(isUndefined(job.MaxCores), 1, job.MaxCores) <= glidein.Cpus", entries())
    assert m.matches({"MaxCores": 6, "RequestMemory": 1000}) == ["west", "gpu"]
    assert m.matches({"RequestMemory": 1000}) == ["east", "west", "gpu"]


def test_expression_valued_job_attributes_from_condor_q_json():
    # condor_q -json writes non-literal expressions as "/Expr(...)/"
    job = {"DESIRED_Sites": "AWS_EAST,AWS_WEST", "RequestCpus": 1,
           "RequestMemory": "/Expr(ifThenElse(MemoryUsage =!= undefined, MemoryUsage, 12000))/"}
    assert classads.job_size(job) == (1, 12000, 0)
    m = classads.Matcher(SITES, entries())
    assert m.matches(job) == ["west"]  # 12 GB does not fit east's 8 GB pilot


def test_split_and_only_where_exact():
    assert classads.split_and("a && (b || c) && d") == ["a", "(b || c)", "d"]
    assert classads.split_and("(a && b)") == ["a", "b"]
    assert classads.split_and("a && b || c") == ["a && b || c"]  # || binds looser: no split
    assert classads.split_and("a ? b && c : d") == ["a ? b && c : d"]
    assert classads.split_and('x == "&&" && y') == ['x == "&&"', "y"]
    assert classads.split_and("a") == ["a"]


@pytest.mark.parametrize("expr", [
    SITES + " && job.RequestCpus <= glidein.Cpus",
    "(" + SITES + " || job.Owner == \"ops\") && job.RequestMemory <= glidein.Memory",
    "job.RequestCpus <= glidein.Cpus && glidein.Memory >= 8192 && " + SITES,
    "job.Owner =!= \"ops\" && " + SITES,  # a conjunct that reads the job alone
    "true",
])
def test_memoised_matching_equals_per_entry_evaluation(expr):
    ents = entries()
    m = classads.Matcher(expr, ents)
    # entries sharing requirements: the same pilot memory shares one evaluation, another memory does not
    ents["west16"] = ({"Cpus": 8, "Memory": 16384, "GPUs": 0, "GLIDEIN_Site": "AWS_WEST"}, ents["west"][1])
    ents["west32"] = ({"Cpus": 16, "Memory": 32768, "GPUs": 0, "GLIDEIN_Site": "AWS_WEST"}, ents["west"][1])
    m = classads.Matcher(expr, ents)
    sites = ["AWS_EAST", "AWS_WEST", "GPU_SITE", "AWS_EAST,AWS_WEST", "AWS_WEST,GPU_SITE", None]
    jobs = []
    for s, cpus, mem, owner, gpus in itertools.product(sites, [1, 4, 8, 16], [1000, 9000, 20000, 40000, None],
                                                        ["ops", "cms", None], [0, 1]):
        job = {"RequestCpus": cpus, "RequestGPUs": gpus, "DESIRED_Sites": s, "RequestMemory": mem, "Owner": owner}
        jobs.append({k: v for k, v in job.items() if v is not None})
    for job in jobs:
        assert m.matches(job) == naive(expr, ents, job), job
    # and it evaluated far fewer times than one per (job, entry)
    assert m.evaluations < len(jobs) * len(ents) / 4


def test_bad_expression_is_refused():
    with pytest.raises(ValueError, match="does not parse"):
        classads.Matcher("job.RequestCpus <= ", entries())
