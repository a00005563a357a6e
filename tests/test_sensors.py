"""Sensors and their triggers: deferrable by default, also poke and reschedule; timeout and failure paths."""

from __future__ import annotations

import asyncio
import time

import pytest
from airflow.sdk.exceptions import AirflowException, TaskDeferred

from airflow_glidein.hooks.ec2 import EC2PilotHook
from airflow_glidein.sensors import PilotsTerminatedSensor
from airflow_glidein.sensors.triggers import PilotsGoneTrigger
from tests.helpers import example_config, write_config


@pytest.fixture
def pilots(ec2, tmp_path, monkeypatch):
    path = write_config(tmp_path, example_config(), monkeypatch)
    made = ec2.client().run_instances(
        ImageId="ami-1", InstanceType="c5.xlarge", MinCount=3, MaxCount=3,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [
            {"Key": "glidein:factory", "Value": "demo-factory"}, {"Key": "glidein:entry", "Value": "aws-us-east-1"},
            {"Key": "glidein:frontend", "Value": "cms"}]}])
    ids = sorted(i["InstanceId"] for i in made["Instances"])
    return str(path), [{"entry": "aws-us-east-1", "conn": "glidein_aws_demo", "ids": ids}], ids


def sensor(path, targets, **kw):
    return PilotsTerminatedSensor(task_id="verify", targets=targets, config_file=path, **kw)


def run_trigger(trigger):
    async def first():
        gen = trigger.run()
        try:
            return await gen.__anext__()
        finally:
            await gen.aclose()

    return asyncio.run(first())


def test_defers_then_trigger_reports_success_when_gone(pilots, ec2):
    path, targets, ids = pilots
    op = sensor(path, targets, poll_interval=0.2, timeout=30)
    assert op.deferrable is True  # the default: no worker slot is held while waiting
    with pytest.raises(TaskDeferred) as exc:
        op.execute({})
    trigger = exc.value.trigger
    # the trigger survives serialisation exactly (the triggerer rebuilds it from this)
    classpath, kwargs = trigger.serialize()
    assert classpath == "airflow_glidein.sensors.triggers.PilotsGoneTrigger"
    rebuilt = PilotsGoneTrigger(**kwargs)
    assert rebuilt.serialize() == (classpath, kwargs)
    ec2.client().terminate_instances(InstanceIds=ids)
    event = run_trigger(rebuilt)
    assert event.payload == {"status": "success", "present": []}
    assert op.execute_complete({}, event.payload) == ids


def test_trigger_times_out_naming_the_pilots_still_there(pilots):
    path, targets, ids = pilots
    trigger = PilotsGoneTrigger(targets=targets, config_file=path, poll_interval=0.1, deadline=time.time() + 0.3)
    event = run_trigger(trigger)
    keys = [f"aws-us-east-1/{i}" for i in ids]  # pilots are named by entry and provider id
    assert event.payload == {"status": "timeout", "present": keys}
    with pytest.raises(AirflowException, match=f"3 pilots still present after terminate: \\['{keys[0]}'"):
        sensor(path, targets).execute_complete({}, event.payload)


def test_trigger_turns_a_provider_error_into_an_error_event(pilots, monkeypatch):
    path, targets, _ = pilots

    def down(self, **params):
        raise ConnectionError("endpoint unreachable")

    monkeypatch.setattr(EC2PilotHook, "_describe", down)
    event = run_trigger(PilotsGoneTrigger(targets=targets, config_file=path, poll_interval=0.1,
                                          deadline=time.time() + 5))
    assert event.payload["status"] == "error" and "endpoint unreachable" in event.payload["message"]
    with pytest.raises(AirflowException, match="Verifying terminations failed: ConnectionError"):
        sensor(path, targets).execute_complete({}, event.payload)


@pytest.mark.parametrize("mode", ["poke", "reschedule"])
def test_poke_and_reschedule_modes_use_the_same_check(pilots, ec2, mode):
    path, targets, ids = pilots
    op = sensor(path, targets, deferrable=False, mode=mode)
    assert op.poke({}) is False
    ec2.client().terminate_instances(InstanceIds=ids[:2])
    assert op.poke({}) is False
    ec2.client().terminate_instances(InstanceIds=ids[2:])
    assert op.poke({}) is True


def test_nothing_to_verify_returns_at_once(pilots):
    path, _, _ = pilots
    assert sensor(path, [{"entry": "aws-us-east-1", "conn": "glidein_aws_demo", "ids": []}]).execute({}) == []


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="poll_interval must be positive"):
        PilotsTerminatedSensor(task_id="v", targets=[], poll_interval=0)


def test_ec2_still_there_looks_ids_up_and_treats_unknown_ones_as_gone(pilots, ec2):
    from airflow_glidein.config import get_config
    from airflow_glidein.hooks import pilot_hook

    path, _, ids = pilots
    cfg = get_config(path)
    hook = pilot_hook(cfg.entry("aws-us-east-1"), cfg.factory.name, "glidein_aws_demo")
    unknown = "i-0123456789abcdef0"  # EC2 forgets terminated instances after a while: NotFound
    assert sorted(hook.still_there(ids + [unknown])) == ids
    ec2.client().terminate_instances(InstanceIds=ids[:1])
    assert sorted(hook.still_there(ids + [unknown])) == ids[1:]
