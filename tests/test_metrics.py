"""Metrics reach a StatsD listener on 127.0.0.1 during real DAG runs."""

from __future__ import annotations

import socket
import threading

import pytest

from tests.helpers import example_config, run_dag, write_config

pytestmark = pytest.mark.usefixtures("airflow_db")


class StatsdListener:
    """A UDP socket on 127.0.0.1 collecting StatsD lines (name:value|type)."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.lines: list[str] = []
        self.running = True
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while self.running:
            try:
                data = self.sock.recv(65535)
            except OSError:
                continue
            self.lines += data.decode().splitlines()

    def values(self, name: str) -> list[str]:
        return [line.split(":", 1)[1] for line in self.lines if line.split(":", 1)[0] == name]

    def close(self):
        self.running = False
        self.thread.join()
        self.sock.close()


@pytest.fixture
def statsd(monkeypatch):
    listener = StatsdListener()
    monkeypatch.setenv("AIRFLOW__METRICS__STATSD_ON", "True")
    monkeypatch.setenv("AIRFLOW__METRICS__STATSD_HOST", "127.0.0.1")
    monkeypatch.setenv("AIRFLOW__METRICS__STATSD_PORT", str(listener.port))
    monkeypatch.setenv("AIRFLOW__METRICS__STATSD_PREFIX", "airflow")
    from airflow.sdk.observability import stats
    from airflow.sdk.observability.metrics.stats_utils import get_stats_factory

    stats.initialize(factory=get_stats_factory(), export_legacy_names=False)  # what the task runner does at start
    yield listener
    listener.close()
    from airflow.sdk._shared.observability.metrics.stats import NoStatsLogger

    stats.initialize(factory=NoStatsLogger, export_legacy_names=False)


def test_demand_levels_pilots_and_launches_are_emitted(ec2, statsd, tmp_path, monkeypatch):
    cfg = example_config()
    cfg["factory"]["retry_delay"] = 0
    write_config(tmp_path, cfg, monkeypatch)
    run_dag("glidein_frontend_cms")
    run_dag("glidein_factory")
    import time

    time.sleep(0.5)  # UDP: let the last packets land
    assert statsd.values("airflow.glidein.demand.idle_jobs.cms.aws-us-east-1") == ["44.0|g"]
    assert statsd.values("airflow.glidein.demand.unmatched.cms") == ["10|g"]
    assert statsd.values("airflow.glidein.request.level.cms.aws-us-west-2") == ["6|g"]
    launches = statsd.values("airflow.glidein.launches.aws-us-east-1")
    assert sum(int(v.split("|")[0]) for v in launches) == 10 and all(v.endswith("|c") for v in launches)
    # the report's gauges count pilots as the factory last saw them: 10 requested at east
    assert statsd.values("airflow.glidein.pilots.aws-us-east-1.requested") == ["10|g"]
    assert statsd.values("airflow.glidein.pilots.aws-us-west-2.requested") == ["5|g"]
    assert statsd.values("airflow.glidein.stuck.aws-us-east-1") == ["0|g"]
    # every provider call is counted per API endpoint (it takes a token of that endpoint's budget)
    calls = sum(int(v.split("|")[0]) for v in statsd.values("airflow.glidein.api.calls.ec2-us-east-1"))
    assert calls == 5  # one listing, then per batch (2) the check-before-create listing and RunInstances
