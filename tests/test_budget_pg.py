"""The API budget holds under concurrency: worker processes hammering one endpoint's budget on PostgreSQL
never spend more than ``requests`` tokens in any window of ``per_seconds``, and each gets all it asked."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from tests.helpers import REPO

WORKER = """
import json, os, sys, time
from pathlib import Path
from airflow_glidein import budget

url, requests, per, n, go, ready, out = sys.argv[1:]

class Recording(budget.SystemClock):
    last = None
    def time(self):  # the budget stamps a token with the last time it read
        self.last = time.time()
        return self.last

clock = budget.CLOCK = Recording()
b = budget.ApiBudget("nova.example.org", int(requests), float(per), max_wait=600, url=url)
b.used()  # connected and migrated before the start line
budget.metrics.incr(1, "test", "warm_up")  # Airflow's Stats loads on first use: not after the start line
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.005)
spent = []
for i in range(int(n)):
    b.acquire(2 if i % 3 == 2 else 1)
    spent += [clock.last] * (2 if i % 3 == 2 else 1)
Path(out).write_text(json.dumps(spent))
os._exit(0)  # skip interpreter teardown (Airflow's exit hooks): the result is written
"""


def start_together(tmp_path, args_of, n: int) -> list[subprocess.CompletedProcess]:
    """Run ``n`` workers that wait at a start line until all have started; returns their results."""
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, *args_of(i), str(go), str(tmp_path / f"ready{i}"),
                               str(tmp_path / f"out{i}")], cwd=REPO, stderr=subprocess.PIPE, text=True)
             for i in range(n)]
    deadline = time.monotonic() + 300
    while not all((tmp_path / f"ready{i}").exists() for i in range(n)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a worker did not start"
        time.sleep(0.05)
    go.touch()
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * n, [e[-2000:] for e in errs]


def most_in_a_window(stamps: list[float], per: float) -> int:
    stamps = sorted(stamps)
    j, most = 0, 0
    for i, t in enumerate(stamps):
        while stamps[j] <= t - per:
            j += 1
        most = max(most, i - j + 1)
    return most


def test_workers_on_postgres_never_overspend_one_endpoint(pg_state_url, tmp_path):
    requests, per, workers, calls = 4, 1.0, 4, 6  # each asks 8 tokens (every third call takes 2)
    start_together(tmp_path, lambda i: [pg_state_url, str(requests), str(per), str(calls)], workers)
    spent = [json.loads((tmp_path / f"out{i}").read_text()) for i in range(workers)]
    assert [len(s) for s in spent] == [8] * workers  # every worker got all it asked
    assert most_in_a_window(sum(spent, []), per) <= requests
