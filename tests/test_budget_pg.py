"""The API budget holds under concurrency: worker processes hammering one endpoint's budget on PostgreSQL
never spend more than ``requests`` tokens in any window of ``per_seconds``, and each gets all it asked."""

from __future__ import annotations

import json

from tests.pg import run_at_once

WORKER = """
import json
from airflow_glidein import budget

url, requests, per, n = ARGS

class Recording(budget.SystemClock):
    last = None
    def time(self):  # the budget stamps a token with the last time it read
        self.last = time.time()
        return self.last

clock = budget.CLOCK = Recording()
b = budget.ApiBudget("nova.example.org", int(requests), float(per), max_wait=600, url=url)
b.used()  # connected and migrated before the start line
budget.metrics.incr(1, "test", "warm_up")  # Airflow's Stats loads on first use: not after the start line
start_line()
spent = []
for i in range(int(n)):
    b.acquire(2 if i % 3 == 2 else 1)
    spent += [clock.last] * (2 if i % 3 == 2 else 1)
finish(json.dumps(spent))
"""


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
    out = run_at_once(tmp_path, WORKER, [[pg_state_url, str(requests), str(per), str(calls)]] * workers)
    spent = [json.loads(o) for o in out]
    assert [len(s) for s in spent] == [8] * workers  # every worker got all it asked
    assert most_in_a_window(sum(spent, []), per) <= requests
