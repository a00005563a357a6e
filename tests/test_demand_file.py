"""The file demand source: condor_q -json and condor_q -autocluster -json, decoded in chunks."""

from __future__ import annotations

import json

import pytest

from airflow_glidein import demand
from tests.helpers import REPO

ATTRS = ["DESIRED_Sites", "RequestCpus", "RequestGPUs", "RequestMemory"]
NOW = 1_700_000_000


def condor_q_json(ads: list[dict]) -> str:
    """The layout condor_q -json prints: one attribute per line, ads separated by a lone comma."""
    body = "\n,\n".join("{\n" + ",\n".join(f'  "{k}": {json.dumps(v)}' for k, v in ad.items()) + "\n}" for ad in ads)
    return "[\n" + body + "\n]\n"


def job(i: int, status: int = 1, qdate: int = NOW - 3600, **kw) -> dict:
    ad = {"ClusterId": 10 + i // 100, "ProcId": i % 100, "JobStatus": status, "QDate": qdate, "RequestCpus": 1,
          "RequestMemory": 2000, "DESIRED_Sites": "A,B", "Owner": "u", "Environment": "X=1", "Cmd": "/bin/true"}
    ad.update(kw)
    return ad


def by_key(groups):
    return {tuple(g.attrs.get(a) for a in ATTRS): (g.idle, g.running, g.idle_old) for g in groups}


def reference(ads: list[dict]) -> dict:
    """The same counts by a plain json.load and a dict, the obvious way."""
    out: dict = {}
    for ad in ads:
        key = tuple(ad.get(a) for a in ATTRS)
        c = out.setdefault(key, [0, 0, 0])
        if ad["JobStatus"] == 1:
            c[0] += 1
            c[2] += ad["QDate"] <= NOW - demand.OLD_IDLE_SECONDS
        elif ad["JobStatus"] == 2:
            c[1] += 1
    return {k: tuple(v) for k, v in out.items() if v[0] or v[1]}


def mixed_jobs() -> list[dict]:
    ads = []
    for i in range(900):
        shape = i % 7
        ads.append(job(i, status=(1, 1, 2, 5, 1, 4, 1)[shape], qdate=NOW - (60 if i % 3 else 7200),
                       RequestCpus=(1, 4, 8)[shape % 3], DESIRED_Sites=("A", "A,B", "B,C", "C")[shape % 4]))
    return ads


@pytest.mark.parametrize("chunk", [97, 4096, 1 << 20])
def test_chunked_decoding_counts_like_a_plain_json_load(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(demand, "CHUNK_BYTES", chunk)
    ads = mixed_jobs()
    path = tmp_path / "q.json"
    path.write_text(condor_q_json(ads))
    assert by_key(demand.read_queue_file(str(path), ATTRS, NOW)) == reference(ads)
    # compact JSON (json.dumps) too
    path.write_text(json.dumps(ads))
    assert by_key(demand.read_queue_file(str(path), ATTRS, NOW)) == reference(ads)


def test_a_brace_and_comma_inside_a_string_falls_back_to_a_whole_decode(tmp_path, monkeypatch):
    monkeypatch.setattr(demand, "CHUNK_BYTES", 64)
    ads = [job(i, Args='{"a": 1}, {"b": "},"}', Env=["x", {"y": 1}]) for i in range(50)]
    path = tmp_path / "q.json"
    path.write_text(condor_q_json(ads))
    assert by_key(demand.read_queue_file(str(path), ATTRS, NOW)) == reference(ads)


def test_attribute_names_are_case_insensitive(tmp_path):
    ads = [{"JobStatus": 1, "QDate": NOW, "requestcpus": 4, "Desired_Sites": "A"} for _ in range(3)]
    path = tmp_path / "q.json"
    path.write_text(json.dumps(ads))
    [g] = demand.read_queue_file(str(path), ATTRS, NOW)
    assert g.attrs == {"DESIRED_Sites": "A", "RequestCpus": 4} and g.idle == 3 and g.idle_old == 0


def test_autocluster_output(tmp_path):
    ads = [
        {"AutoClusterId": 1, "JobCount": 40, "RequestCpus": 1, "RequestMemory": 2000, "DESIRED_Sites": "A"},
        {"AutoClusterId": 2, "JobCount": 3, "RequestCpus": 8, "RequestMemory": 16000, "DESIRED_Sites": "A,B"},
        {"AutoClusterId": 3, "JobCount": 2, "RequestCpus": 1, "RequestMemory": 2000, "DESIRED_Sites": "A"},
    ]
    path = tmp_path / "ac.json"
    path.write_text(condor_q_json(ads))
    groups = by_key(demand.read_queue_file(str(path), ATTRS, NOW))
    # autoclusters 1 and 3 look the same to the match: one group; an autocluster is settled (old) demand
    assert groups == {("A", 1, None, 2000): (42, 0, 42), ("A,B", 8, None, 16000): (3, 0, 3)}


def test_example_queue_file():
    groups = demand.read_queue_file(str(REPO / "examples" / "queue.json"), ATTRS, NOW)
    raw = json.loads((REPO / "examples" / "queue.json").read_text())
    assert sum(g.idle for g in groups) == sum(ad["JobStatus"] == 1 for ad in raw)
    assert sum(g.running for g in groups) == sum(ad["JobStatus"] == 2 for ad in raw)


@pytest.mark.parametrize("text, message", [
    ("", None),
    ("{}", "expected a list of ads"),
    ('[{"JobStatus": 1,', "not condor_q -json output"),
    ("not json", "expected a list of ads"),
])
def test_bad_files_name_the_problem(tmp_path, text, message):
    path = tmp_path / "q.json"
    path.write_text(text)
    if message is None:
        assert demand.read_queue_file(str(path), ATTRS, NOW) == []
        return
    with pytest.raises(ValueError, match=message) as err:
        demand.read_queue_file(str(path), ATTRS, NOW)
    assert str(path) in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read queue file .*missing.json"):
        demand.read_queue_file(str(tmp_path / "missing.json"), ATTRS, NOW)


def test_plan_command_prints_the_plan_and_touches_no_cloud(tmp_path):
    import subprocess
    import sys

    env_free = {"PATH": "/usr/bin:/bin", "AWS_EC2_METADATA_DISABLED": "true"}  # no credentials, no Airflow home
    out = subprocess.run([sys.executable, "-m", "airflow_glidein", "plan", str(REPO / "examples" / "glidein.yaml"),
                          "--queue", str(REPO / "examples" / "queue.json")], capture_output=True, text=True,
                         env=env_free, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines() if line.startswith("aws-")}
    assert rows["aws-us-east-1"][6] == "13" and rows["aws-us-west-2"][6] == "6"  # the level column
    assert "71 idle / 5 running jobs in 5 groups (10 idle match no entry)" in out.stdout
    # the autocluster form of the same demand: one ad per group
    groups = demand.read_queue_file(str(REPO / "examples" / "queue.json"), ATTRS, NOW)
    ac = [{"AutoClusterId": i, "JobCount": g.idle, **g.attrs} for i, g in enumerate(groups) if g.idle]
    path = tmp_path / "ac.json"
    path.write_text(json.dumps(ac))
    out = subprocess.run([sys.executable, "-m", "airflow_glidein", "plan", str(REPO / "examples" / "glidein.yaml"),
                          "--queue", str(path), "--json"], capture_output=True, text=True, env=env_free, timeout=120)
    assert out.returncode == 0, out.stderr
    levels = {e: p["idle"] for e, p in json.loads(out.stdout)["cms"]["entries"].items()}
    assert levels == {"aws-us-east-1": 13, "aws-us-west-2": 6}
    # a bad queue file: a clear error, exit 1
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a list"}')
    out = subprocess.run([sys.executable, "-m", "airflow_glidein", "plan", str(REPO / "examples" / "glidein.yaml"),
                          "--queue", str(bad)], capture_output=True, text=True, env=env_free, timeout=120)
    assert out.returncode == 1 and "is not condor_q -json output" in out.stderr
