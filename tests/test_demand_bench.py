"""The benchmark's code path at a small scale (the full run is `make bench`), so it cannot rot."""

from __future__ import annotations

import importlib.util
import json

from tests.helpers import REPO


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_demand", REPO / "bench" / "bench_demand.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_demand_small(tmp_path):
    bench = load_bench()
    res = bench.run(tmp_path, n_jobs=20_000, n_shapes=50, n_entries=20, sample=2_000)
    text = bench.report(res, 20_000, 50, 20)
    p, a, r = res["plan"], res["autocluster"], res["ratio"]
    assert p["idle"] == 20_000 and a["idle"] == 20_000
    assert p["groups"] == a["groups"] <= 50
    assert a["levels"] == p["levels"] and sum(p["levels"].values()) > 0  # both sources, one plan
    assert r["agree"] and r["jobs"] == 2_000  # grouped matching gives every job its own matches
    assert "goal <= 30 s" in text and "goal >= 100x" in text
    # the generated input is condor_q -json and deterministic
    queue = tmp_path / "queue_20000j_50s_20e.json"
    first = json.loads(queue.read_text())[0]
    assert first["JobStatus"] == 1 and "DESIRED_Sites" in first
    assert bench.shapes(50, 20) == bench.shapes(50, 20)
