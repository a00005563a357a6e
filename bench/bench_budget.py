"""API budget figures: the cost of a token, and 500 OpenStack servers managed under 500 calls / 5 min.

Run from the repository root: ``python -m bench.bench_budget``. The cloud is
tests/servers/nova.py on 127.0.0.1 with the real openstacksdk, on a simulated
clock (the 5-minute windows cost no wall time). Goals: a token costs under
10 ms (SQLite state store; every worker shares it), and the 500-server cycle
sees no throttled call and no window over budget.
"""

from __future__ import annotations

import os
import tempfile
import time

os.environ.setdefault("GLIDEIN_STATE_URL", f"sqlite:///{tempfile.mkdtemp()}/glidein_state.db")
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp())


def token_cost(n: int = 500) -> float:
    from airflow_glidein.budget import ApiBudget

    b = ApiBudget("bench-tokens", requests=10 * n, per_seconds=300)
    b.acquire()
    t = time.perf_counter()
    for _ in range(n):
        b.acquire()
    return (time.perf_counter() - t) / n * 1000


def five_hundred_servers() -> dict:
    from airflow_glidein import budget
    from airflow_glidein.config import Entry
    from airflow_glidein.hooks import LaunchSpec, pilot_hook
    from tests.servers.common import SimClock, signed_envelope
    from tests.servers.nova import NovaServer

    clock = SimClock(tick=0.01)
    budget.CLOCK = clock
    nova = NovaServer().start()
    nova.clock = clock
    nova.throttle.set(500, 300)
    os.environ["AIRFLOW_CONN_BENCH_OS"] = nova.connection_json()
    entry = Entry(name="cern-bench", middleware="openstack", region="RegionOne", image="img-glidein",
                  flavor="f-4c8g", trust_domain="cern", endpoint="nova-bench",
                  options={"network": "net-private", "multi_create": False})
    hook = pilot_hook(entry, "bench", "bench_os")
    t = time.perf_counter()
    for batch in range(10):
        launch = f"bench.cms.{batch}"
        hook.launch(LaunchSpec(launch_id=launch, frontend="cms", count=50, image="img-glidein",
                               userdata=signed_envelope("openstack", {"launch_id": launch})))
    ids = [i.id for i in hook.list_pilots()]
    report = hook.terminate_verified(ids, settle=10)
    wall = time.perf_counter() - t
    nova.stop()
    return {"servers": len(ids), "gone": len(report.gone), "calls": len(nova.calls),
            "max_in_5min": nova.max_in_window(300), "throttled": nova.throttle.refused,
            "simulated_s": clock.now - 1_700_000_000.0, "wall_s": wall}


def main() -> None:
    ms = token_cost()
    print(f"budget token: {ms:.2f} ms per call (goal < 10 ms)")
    r = five_hundred_servers()
    print(f"500 servers launched, listed, reaped: {r['calls']} calls in {r['simulated_s']:.0f} s simulated, "
          f"{r['wall_s']:.1f} s wall; max {r['max_in_5min']} calls in any 5 min (goal <= 500), "
          f"{r['throttled']} throttled (goal 0), {r['gone']}/{r['servers']} gone")


if __name__ == "__main__":
    main()
