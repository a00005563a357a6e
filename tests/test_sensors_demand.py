"""IdleJobsSensor and PilotsRegisteredSensor against the pool stand-in (and moto for the pilots).

Deferrable mode drives the triggers' async loops for real (their checks run
in worker threads, the schedd queries in forked children); poke and
reschedule modes use the same checks. Success, timeout and failure paths.
"""

from __future__ import annotations

import asyncio
import re
import time

import pytest
from airflow.sdk.exceptions import AirflowException, AirflowSensorTimeout, TaskDeferred

from airflow_glidein import pilotdb, state
from airflow_glidein.sensors import IdleJobsSensor, PilotsRegisteredSensor
from airflow_glidein.sensors.triggers import IdleJobsTrigger, PilotsJoinedTrigger
from tests.helpers import example_config, write_config
from tests.standins.condor import RUNNING, Pool

EAST = {"RequestCpus": 1, "RequestMemory": 2000, "DESIRED_Sites": "AWS_US_EAST_1", "Owner": "cms"}
WEST = {"RequestCpus": 8, "RequestMemory": 16000, "DESIRED_Sites": "AWS_US_WEST_2", "Owner": "cms"}
NOWHERE = {"RequestCpus": 1, "RequestMemory": 2000, "DESIRED_Sites": "GCP_EUROPE", "Owner": "cms"}


@pytest.fixture
def pool(monkeypatch):
    p = Pool().install(monkeypatch)
    yield p
    p.close()


@pytest.fixture
def cfg_path(pool, tmp_path, monkeypatch):
    """The example configuration, its frontend reading the stand-in schedds, its factory the stand-in collector."""
    cfg = example_config()
    cfg["factory"]["collector"] = pool.address
    cfg["frontends"][0]["demand"] = {"collector": pool.address, "constraint": 'Owner == "cms"', "timeout": 5}
    return str(write_config(tmp_path, cfg, monkeypatch))


def first_event(trigger, before=None, wait: float = 0.0, limit: float = 20.0):
    """Run the trigger's loop; ``before()`` runs after ``wait`` s, while it is polling. Returns (event, early).

    ``early`` is True if the trigger fired before ``before`` ran (it did not wait).
    """
    async def scenario():
        gen = trigger.run()
        pending = asyncio.ensure_future(gen.__anext__())
        early = False
        try:
            if before is not None:
                await asyncio.sleep(wait)
                early = pending.done()
                before()
            return await asyncio.wait_for(pending, limit), early
        finally:
            if not pending.done():
                pending.cancel()
            await gen.aclose()

    return asyncio.run(scenario())


def quiet_for(trigger, seconds: float) -> bool:
    """True if the trigger fires nothing within ``seconds``."""
    async def scenario():
        gen = trigger.run()
        try:
            await asyncio.wait_for(gen.__anext__(), seconds)
            return False
        except asyncio.TimeoutError:
            return True
        finally:
            await gen.aclose()

    return asyncio.run(scenario())


def round_trip(trigger, cls):
    classpath, kwargs = trigger.serialize()
    assert classpath == f"airflow_glidein.sensors.triggers.{cls.__name__}"
    rebuilt = cls(**kwargs)
    assert rebuilt.serialize() == (classpath, kwargs)  # the triggerer rebuilds it from exactly this
    return rebuilt


# ---- IdleJobsSensor ------------------------------------------------------------------------------


def idle_sensor(path, **kw):
    return IdleJobsSensor(task_id="wait_for_jobs", frontend="cms", config_file=path, **kw)


def test_idle_jobs_sensor_defers_and_fires_when_demand_reaches_the_threshold(pool, cfg_path):
    sd = pool.add_schedd("schedd1")
    sd.add_jobs(EAST, 3)
    sd.add_jobs(WEST, 4, status=RUNNING)  # running jobs are not idle demand
    op = idle_sensor(cfg_path, threshold=10, poll_interval=0.2, timeout=60)
    assert op.deferrable is True
    with pytest.raises(TaskDeferred) as exc:
        op.execute({})  # 3 < 10: nothing to return yet, the worker slot is freed
    trigger = round_trip(exc.value.trigger, IdleJobsTrigger)
    assert trigger.deadline is not None and trigger.threshold == 10

    looked = []

    def more_jobs():
        looked.append(len(sd.queries))
        sd.add_jobs(EAST, 7)

    event, early = first_event(trigger, before=more_jobs, wait=0.8)
    assert not early and looked[0] >= 4  # two queries per check: execute's, then the trigger's polls; it waited
    assert event.payload["status"] == "success"
    assert event.payload["demand"]["idle"] == 10
    assert event.payload["demand"]["per_entry"] == {"aws-us-east-1": 10, "aws-us-west-2": 0}
    assert op.execute_complete({}, event.payload)["idle"] == 10


def test_idle_jobs_sensor_returns_at_once_when_demand_is_there(pool, cfg_path):
    pool.add_schedd("schedd1").add_jobs(WEST, 2)
    found = idle_sensor(cfg_path, threshold=2).execute({})
    assert found["idle"] == 2 and found["per_entry"]["aws-us-west-2"] == 2 and found["missing_schedds"] == []


def test_only_jobs_matching_the_entries_count(pool, cfg_path):
    sd = pool.add_schedd("schedd1")
    sd.add_jobs(NOWHERE, 50)  # no entry of the frontend can run these
    sd.add_jobs(EAST, 2)
    sd.add_jobs(WEST, 1)
    op = idle_sensor(cfg_path, threshold=3, deferrable=False)
    ret = op.poke({})
    assert ret.is_done and ret.xcom_value["unmatched"] == 50 and ret.xcom_value["idle"] == 3
    west_only = idle_sensor(cfg_path, threshold=2, entries=["aws-us-west-2"], deferrable=False)
    assert west_only.poke({}).is_done is False  # one west job
    with pytest.raises(AirflowException, match=r"Frontend cms has no entries \['gcp-europe'\]"):
        idle_sensor(cfg_path, entries=["gcp-europe"], deferrable=False).poke({})


def test_idle_jobs_trigger_times_out_with_the_count(pool, cfg_path):
    pool.add_schedd("schedd1").add_jobs(EAST, 4)
    event, _ = first_event(IdleJobsTrigger(frontend="cms", config_file=cfg_path, threshold=100, poll_interval=0.1,
                                           deadline=time.time() + 0.5))
    assert event.payload["status"] == "timeout" and event.payload["demand"]["idle"] == 4
    with pytest.raises(AirflowSensorTimeout, match="Frontend cms: 4 matching idle jobs at the deadline, fewer than 100"):
        idle_sensor(cfg_path, threshold=100).execute_complete({}, event.payload)


def test_idle_jobs_trigger_turns_an_unreachable_pool_into_an_error_event(pool, cfg_path):
    pool.add_schedd("schedd1").add_jobs(EAST, 4)
    pool.collector.fail("Failed to connect to collector")
    event, _ = first_event(IdleJobsTrigger(frontend="cms", config_file=cfg_path, threshold=1, poll_interval=0.1,
                                           deadline=time.time() + 30))
    assert event.payload["status"] == "error"
    assert "collector did not list the schedds" in event.payload["message"]
    with pytest.raises(AirflowException, match="Reading the demand of frontend cms failed: RuntimeError"):
        idle_sensor(cfg_path).execute_complete({}, event.payload)


@pytest.mark.parametrize("mode", ["poke", "reschedule"])
def test_idle_jobs_poke_and_reschedule_use_the_same_check(pool, cfg_path, mode):
    sd = pool.add_schedd("schedd1")
    op = idle_sensor(cfg_path, threshold=5, deferrable=False, mode=mode)
    assert op.poke({}).is_done is False
    sd.add_jobs(EAST, 4)
    assert op.poke({}).is_done is False
    sd.add_jobs(EAST, 1)
    ret = op.poke({})
    assert ret.is_done is True and ret.xcom_value["idle"] == 5


# ---- PilotsRegisteredSensor ----------------------------------------------------------------------


def launch(ec2, n, request="frontend-run-1", launch_id="L-1", burst=None, region="us-east-1",
           entry="aws-us-east-1"):
    tags = {"glidein:factory": "demo-factory", "glidein:entry": entry, "glidein:frontend": "cms",
            "glidein:request": request, "glidein:launch": launch_id}
    if burst:
        tags["glidein:burst"] = burst
    made = ec2.client(region).run_instances(
        ImageId="ami-1", InstanceType="c5.xlarge", MinCount=n, MaxCount=n,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}])
    return sorted(f"{entry}/{i['InstanceId']}" for i in made["Instances"])  # pilot keys: entry/instance id


def bare(keys):
    """The provider's ids of pilot keys."""
    return [k.split("/", 1)[1] for k in keys]


def register(pool, pilot_key, slots=1, factory="demo-factory"):
    """A pilot's startd joins: it advertises its pilot key (entry/instance id) as GLIDEIN_PILOT_ID."""
    for n in range(slots):  # a pilot's startd may advertise several slots: it counts once
        pool.add_startd({"Name": f"slot{n + 1}@{pilot_key}", "GLIDEIN_PILOT_ID": pilot_key, "GLIDEIN_Factory": factory,
                         "State": "Unclaimed", "Activity": "Idle"})


def reg_sensor(path, **kw):
    if not (kw.get("launch") or kw.get("burst")):
        kw.setdefault("request", "frontend-run-1")
    return PilotsRegisteredSensor(task_id="wait_for_pilots", config_file=path, **kw)


def test_registered_sensor_defers_and_fires_when_enough_pilots_joined(pool, cfg_path, ec2):
    ids = launch(ec2, 3)
    other = launch(ec2, 2, request="frontend-run-0", launch_id="L-0")
    for pid in other:
        register(pool, pid)  # another request's pilots do not count
    register(pool, ids[0], slots=4)
    op = reg_sensor(cfg_path, min_pilots=2, poll_interval=0.2, timeout=60)
    assert op.deferrable is True
    with pytest.raises(TaskDeferred) as exc:
        op.execute({})
    trigger = round_trip(exc.value.trigger, PilotsJoinedTrigger)
    assert (trigger.kind, trigger.value, trigger.min_pilots) == ("request", "frontend-run-1", 2)

    event, early = first_event(trigger, before=lambda: register(pool, ids[2]), wait=0.8)
    assert not early
    assert event.payload["status"] == "success"
    found = event.payload["found"]
    assert found["pilots"] == 3 and found["registered"] == sorted([ids[0], ids[2]])
    assert [w["id"] for w in found["waiting"]] == [ids[1]]
    assert op.execute_complete({}, event.payload) == sorted([ids[0], ids[2]])


def test_registered_sensor_times_out_naming_the_pilots_that_never_booted(pool, cfg_path, ec2):
    ids = launch(ec2, 4)
    west = launch(ec2, 1, region="us-west-2", entry="aws-us-west-2")
    ec2.age(bare(ids), 1200)
    register(pool, ids[0])
    # the factory's last inventory: ids[1] failed to boot (its VM powered off and is gone since),
    # ids[2] registered once and left again (it counts: it joined), ids[3] still booting
    now = time.time()
    row = {"entry": "aws-us-east-1", "frontend": "cms", "burst": None, "request": "frontend-run-1", "launch": "L-1",
           "factory_run": "factory-run-1", "launched": now - 1200, "conn": "glidein_aws_demo", "detail": "",
           "startd": None, "policy": None, "memory": {}, "updated": now}
    pilotdb.save_pilots(state.store(), [
        {**row, "id": bare(ids)[1], "state": "boot_failed", "provider_state": "stopped",
         "detail": "Client.InstanceInitiatedShutdown"},
        {**row, "id": bare(ids)[2], "state": "idle", "provider_state": "running",
         "memory": {"first_registered": now - 600}},
        {**row, "id": bare(ids)[3], "state": "booting", "provider_state": "running"},
    ])
    ec2.client().terminate_instances(InstanceIds=[bare(ids)[1]])
    trigger = PilotsJoinedTrigger(kind="request", value="frontend-run-1", min_pilots=4, entries=None,
                                  config_file=cfg_path, poll_interval=0.1, deadline=time.time() + 0.4)
    event, _ = first_event(trigger)
    assert event.payload["status"] == "timeout"
    found = event.payload["found"]
    assert found["pilots"] == 5 and found["registered"] == sorted(ids[:1] + ids[2:3])
    states = {w["id"]: (w["entry"], w["provider_state"], w["state"]) for w in found["waiting"]}
    assert states == {ids[1]: ("aws-us-east-1", "gone", "boot_failed"), ids[3]: ("aws-us-east-1", "running", "booting"),
                      west[0]: ("aws-us-west-2", "running", None)}
    with pytest.raises(AirflowSensorTimeout) as exc:
        reg_sensor(cfg_path, min_pilots=4, timeout=900).execute_complete({}, event.payload)
    msg = str(exc.value)
    assert msg.startswith("2 of 5 pilots of request frontend-run-1 joined the pool within 900 s; 4 wanted. "
                          "Never registered: ")
    assert re.search(rf"{ids[1]} \(gone from its provider, boot_failed at the factory's last "
                     rf"inventory, launched 12\d\d s ago: Client.InstanceInitiatedShutdown\)", msg)
    assert re.search(rf"{ids[3]} \(running, booting at the factory's last inventory, "
                     rf"launched 12\d\d s ago\)", msg)
    assert re.search(rf"{west[0]} \(running, launched \d s ago\)", msg)
    assert ids[0] not in msg and ids[2] not in msg


def test_registered_sensor_with_no_pilots_at_all_says_so(pool, cfg_path, ec2):
    op = reg_sensor(cfg_path, burst="b-123", deferrable=False, timeout=0.3, poke_interval=0.1)
    with pytest.raises(AirflowSensorTimeout, match="no pilot of burst b-123 is listed at any provider"):
        op.execute({})  # poke mode: Airflow's timeout, with the details of the last check


def test_registered_sensor_by_launch_and_by_burst(pool, cfg_path, ec2):
    a = launch(ec2, 2, launch_id="L-a")
    b = launch(ec2, 1, launch_id="L-b", burst="b-7")
    for pid in a + b:
        register(pool, pid)
    assert reg_sensor(cfg_path, launch="L-a", min_pilots=2).execute({}) == a
    assert reg_sensor(cfg_path, burst="b-7").execute({}) == b
    assert reg_sensor(cfg_path, min_pilots=3, entries=["aws-us-east-1"]).execute({}) == sorted(a + b)


def test_registered_trigger_errors_become_error_events(pool, cfg_path, ec2, tmp_path, monkeypatch):
    launch(ec2, 1)
    pool.collector.fail("Failed to connect to collector")
    event, _ = first_event(PilotsJoinedTrigger(kind="request", value="frontend-run-1", min_pilots=1, entries=None,
                                               config_file=cfg_path, poll_interval=0.1, deadline=time.time() + 30))
    assert event.payload["status"] == "error" and "Failed to connect to collector" in event.payload["message"]
    with pytest.raises(AirflowException, match="Watching the registration of request frontend-run-1 failed"):
        reg_sensor(cfg_path).execute_complete({}, event.payload)
    # a factory without a collector cannot observe registration: a clear error, not a wait
    cfg = example_config()
    no_collector = str(write_config(tmp_path, cfg, name="no-collector.yaml"))
    with pytest.raises(ValueError, match="factory.collector is not set"):
        reg_sensor(no_collector).execute({})


def test_one_entry_listing_failing_does_not_stop_the_others(pool, cfg_path, ec2, monkeypatch):
    from airflow_glidein.hooks.ec2 import EC2PilotHook
    from airflow_glidein.sensors.registered import registration

    east = launch(ec2, 2)
    register(pool, east[0])
    now = time.time()
    pilotdb.save_pilots(state.store(), [{
        "id": "i-west1", "entry": "aws-us-west-2", "frontend": "cms", "burst": None, "request": "frontend-run-1",
        "launch": "L-2", "factory_run": "f-1", "launched": now - 300, "state": "booting", "provider_state": "pending",
        "conn": "glidein_aws_demo", "detail": "", "startd": None, "policy": None, "memory": {}, "updated": now}])
    real = EC2PilotHook._list

    def west_down(self, launch_id=None):
        if self.entry.name == "aws-us-west-2":
            raise ConnectionError("us-west-2 endpoint unreachable")
        return real(self, launch_id)

    monkeypatch.setattr(EC2PilotHook, "_list", west_down)
    found = registration(cfg_path, "request", "frontend-run-1")
    assert found["errors"] == {"aws-us-west-2": "ConnectionError: us-west-2 endpoint unreachable"}
    assert found["registered"] == [east[0]]
    # the west pilot is not called gone: its listing failed, so it is shown as the factory last saw it
    assert {w["id"]: w["provider_state"] for w in found["waiting"]} == {east[1]: "running",
                                                                         "aws-us-west-2/i-west1": "pending"}
    monkeypatch.setattr(EC2PilotHook, "_list", lambda self, launch_id=None: (_ for _ in ()).throw(
        ConnectionError("all down")))
    with pytest.raises(RuntimeError, match="no entry could be listed"):
        registration(cfg_path, "request", "frontend-run-1")


@pytest.mark.parametrize("mode", ["poke", "reschedule"])
def test_registered_poke_and_reschedule_use_the_same_check(pool, cfg_path, ec2, mode):
    ids = launch(ec2, 2)
    op = reg_sensor(cfg_path, min_pilots=2, deferrable=False, mode=mode)
    assert op.poke({}).is_done is False
    register(pool, ids[1])
    assert op.poke({}).is_done is False
    register(pool, ids[0])
    ret = op.poke({})
    assert ret.is_done is True and ret.xcom_value == ids


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="give exactly one of request, launch or burst \\(got none\\)"):
        PilotsRegisteredSensor(task_id="r")
    with pytest.raises(ValueError, match=r"got \['request', 'burst'\]"):
        PilotsRegisteredSensor(task_id="r", request="x", burst="y")
    with pytest.raises(ValueError, match="min_pilots must be a positive number"):
        PilotsRegisteredSensor(task_id="r", request="x", min_pilots=0)
    with pytest.raises(ValueError, match="threshold must be a positive number of jobs"):
        IdleJobsSensor(task_id="i", frontend="cms", threshold=0)
    with pytest.raises(ValueError, match="poll_interval must be positive"):
        IdleJobsSensor(task_id="i", frontend="cms", poll_interval=0)
