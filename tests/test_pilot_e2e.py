"""End to end: frontend and factory DAGs launch pilots on moto, then every instance "boots" here.

For each instance the factory made, the test reads its real UserData back
from moto, serves it from an IMDSv2 stand-in on 127.0.0.1 and runs the real
wrapper, which fetches the startup script from the real bootstrap service
(our plugin inside Airflow's API server), exchanges the launch's token,
writes the condor configuration, runs the condor_master stand-in (HTCondor
daemons cannot be installed here), and uploads the logs, which the test reads
back through the service's authenticated viewer.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from airflow_glidein import pilots as P
from airflow_glidein.userdata import parse
from tests.helpers import POOL_TOKEN, run_dag, task_states, write_config
from tests.pilot_helpers import VM, pilot_config, userdata_of
from tests.standins.metadata import MetadataServer

pytestmark = pytest.mark.usefixtures("airflow_db")


def test_launched_pilots_boot_join_and_return_their_logs(ec2, bootstrap_server, tmp_path, monkeypatch):
    cfg = pilot_config(tmp_path, monkeypatch, bootstrap_server)
    assert str(run_dag("glidein_frontend_cms").state) == "success"
    fa = run_dag("glidein_factory")
    assert str(fa.state) == "success", task_states(fa)
    pilots = [(i, "us-east-1", "aws-us-east-1") for i in ec2.instances("us-east-1")] + \
             [(i, "us-west-2", "aws-us-west-2") for i in ec2.instances("us-west-2")]
    assert len(pilots) == 15
    # No collector can run here, so the factory ran without one (registration not observed);
    # the pool's collector is configured now, as the pilots will read it at their exchange.
    cfg["factory"]["collector"] = "cm.example.org:9618"
    write_config(tmp_path, cfg, monkeypatch)

    def boot(pilot):
        inst, region, entry = pilot
        iid = inst["InstanceId"]
        raw = userdata_of(ec2, iid, region)
        envelope = parse(raw.decode())
        assert envelope["launch_id"] == inst["TagMap"][P.TAG_LAUNCH] and envelope["entry"] == entry
        assert b"pool-token-value" not in raw and b"testing-secret-key" not in raw
        with MetadataServer("imdsv2", raw, iid) as md:
            vm = VM(tmp_path / iid, bootstrap_server, {"GLIDEIN_IMDS_URL": md.url})
            return pilot, vm, vm.boot(timeout=120)

    with ThreadPoolExecutor(4) as pool:  # VMs of one batch boot together and share one token
        booted = list(pool.map(boot, pilots))

    start_expr = cfg["frontends"][0]["start_expr"]
    for (inst, _, entry), vm, proc in booted:
        iid = inst["InstanceId"]
        assert proc.returncode == 0, proc.stderr
        assert vm.powered_off
        conf = vm.condor_config()
        for line in (f'GLIDEIN_PILOT_ID = "{entry}/{iid}"', f'GLIDEIN_Entry_Name = "{entry}"', 'GLIDEIN_Frontend = "cms"',
                     'GLIDEIN_Factory = "demo-factory"', f'GLIDEIN_Launch = "{inst["TagMap"][P.TAG_LAUNCH]}"',
                     "COLLECTOR_HOST = cm.example.org:9618", "CCB_ADDRESS = $(COLLECTOR_HOST)",
                     f"START = ({start_expr}) && (time() < GLIDEIN_ToRetire)", "STARTD_NOCLAIM_SHUTDOWN = 1200"):
            assert line in conf, (line, conf)
        assert (vm.work / "condor" / "tokens.d" / "pilot.idtoken").read_text() == POOL_TOKEN
        assert not (vm.work / "exchange").exists()  # the exchange's reply (credential, upload token) is gone

        logs = bootstrap_server.logs(entry, iid)
        assert {"glidein.log", "condor_master.stdout", "condor_master.stderr", "MasterLog", "StartLog",
                "StandinParams.json"} <= set(logs)
        assert f'condor_master stand-in running pilot "{entry}/{iid}"' in logs["condor_master.stdout"]
        assert "condor_master exited with status 0: normal exit" in logs["glidein.log"]
        # what HTCondor itself (the htcondor2 bindings) read from the written configuration
        params = json.loads(logs["StandinParams.json"])
        assert params["GLIDEIN_PILOT_ID"] == f'"{entry}/{iid}"' and params["GLIDEIN_Entry_Name"] == f'"{entry}"'
        assert params["COLLECTOR_HOST"] == params["CCB_ADDRESS"] == "cm.example.org:9618"
        assert params["GLIDEIN_Site"] == ('"AWS_US_EAST_1"' if entry == "aws-us-east-1" else '"AWS_US_WEST_2"')
        assert "GLIDEIN_PILOT_ID" in params["STARTD_ATTRS"] and "GLIDEIN_Site" in params["STARTD_ATTRS"]
        assert params["_token_files"] == ["pilot.idtoken"]
