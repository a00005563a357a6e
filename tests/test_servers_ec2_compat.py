"""The EC2-compatible test server's switches (tests/servers/ec2_compat.py), through real clients.

Each switch is seen the way the product would see it: through boto3 or the
Amazon provider's EC2Hook against the proxy, while what moto really holds is
read behind the proxy (``ec2_compat.instances()``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import pytest
from botocore.exceptions import ClientError

from tests.servers.common import SimClock

AMI = "ami-1e749f67"
TAGS = [{"ResourceType": "instance", "Tags": [{"Key": "glidein:launch", "Value": "run1.cms.0"}]}]
BY_TAG = [{"Name": "tag:glidein:launch", "Values": ["run1.cms.0"]}]


@pytest.fixture
def client(ec2_compat):
    return ec2_compat.client(retries={"total_max_attempts": 1})  # each answer as the server gave it


def listed(client, **kwargs) -> list[str]:
    pages = client.get_paginator("describe_instances").paginate(**kwargs)
    return sorted(i["InstanceId"] for page in pages for r in page["Reservations"] for i in r["Instances"])


def error(call) -> tuple[int, str, str]:
    with pytest.raises(ClientError) as info:
        call()
    e = info.value.response
    return e["ResponseMetadata"]["HTTPStatusCode"], e["Error"]["Code"], e["Error"]["Message"]


def run(client, n: int = 2, **kwargs) -> list[str]:
    return sorted(i["InstanceId"] for i in client.run_instances(ImageId=AMI, MinCount=n, MaxCount=n,
                                                                **kwargs)["Instances"])


def test_new_instances_lag_out_of_listings_and_lookups_by_id(ec2_compat):
    from airflow.providers.amazon.aws.hooks.ec2 import EC2Hook

    clock = SimClock()
    ec2_compat.clock = clock.time  # a plain callable works too
    ec2_compat.set(lag=30)
    hook = EC2Hook(api_type="client_type", aws_conn_id="glidein_aws_test", region_name="us-east-1")
    old = run(hook.conn, TagSpecifications=TAGS)
    clock.sleep(30)
    new = run(hook.conn, TagSpecifications=TAGS)
    assert len(ec2_compat.instances()) == 4  # moto holds all four

    assert listed(hook.conn) == listed(hook.conn, Filters=BY_TAG) == old
    for call in (lambda: hook.conn.describe_instances(InstanceIds=[old[0], new[0]]),
                 lambda: hook.conn.terminate_instances(InstanceIds=new),
                 lambda: hook.conn.create_tags(Resources=new, Tags=[{"Key": "k", "Value": "v"}])):
        status, code, message = error(call)
        assert (status, code) == (400, "InvalidInstanceID.NotFound")
        assert new[0] in message and old[0] not in message
    assert hook.get_instance_state(old[0]) == "running"

    clock.sleep(29.9)
    assert listed(hook.conn) == old
    clock.sleep(0.1)
    assert listed(hook.conn, Filters=BY_TAG) == sorted(old + new)
    hook.conn.terminate_instances(InstanceIds=new)
    assert sorted(i["InstanceId"] for i in ec2_compat.instances()) == old


def test_tags_of_new_instances_lag_behind_the_instances(ec2_compat, client):
    clock = SimClock()
    ec2_compat.clock = clock
    ec2_compat.set(tag_lag=60)
    ids = run(client, TagSpecifications=TAGS)
    seen = {i["InstanceId"]: i.get("Tags", []) for r in client.describe_instances()["Reservations"]
            for i in r["Instances"]}
    assert seen == {i: [] for i in ids}  # listed, not yet tagged
    assert listed(client, Filters=BY_TAG) == []
    clock.sleep(60)
    assert listed(client, Filters=BY_TAG) == ids
    client.create_tags(Resources=ids[:1], Tags=[{"Key": "glidein:state", "Value": "draining"}])
    assert listed(client, Filters=[{"Name": "tag:glidein:state", "Values": ["draining"]}]) == []
    clock.sleep(60)
    assert listed(client, Filters=[{"Name": "tag:glidein:state", "Values": ["draining"]}]) == ids[:1]


def test_client_token_as_aws_honours_it(ec2_compat, client):
    first = run(client, ClientToken="launch-1", TagSpecifications=TAGS)
    assert run(client, ClientToken="launch-1", TagSpecifications=TAGS) == first  # the same call: nothing new
    assert len(ec2_compat.instances()) == 2
    status, code, _ = error(lambda: run(client, n=3, ClientToken="launch-1"))
    assert (status, code) == (400, "IdempotentParameterMismatch")
    assert len(ec2_compat.instances()) == 2
    tokens = {i["InstanceId"]: i.get("ClientToken") for r in client.describe_instances()["Reservations"]
              for i in r["Instances"]}
    assert tokens == {i: "launch-1" for i in first}


def test_client_token_as_eucalyptus_returns_the_tokens_instances_unchecked(ec2_compat, client):
    ec2_compat.set(client_token="eucalyptus")
    first = run(client, ClientToken="launch-1")
    assert run(client, n=3, ClientToken="launch-1", InstanceType="m1.large") == first
    assert len(ec2_compat.instances()) == 2


def test_client_token_ignored_makes_new_instances_and_is_never_echoed(ec2_compat, client):
    ec2_compat.set(client_token="ignore")
    first = run(client, ClientToken="launch-1")
    second = run(client, ClientToken="launch-1")
    assert not set(first) & set(second) and len(ec2_compat.instances()) == 4
    assert all("ClientToken" not in i for r in client.describe_instances()["Reservations"] for i in r["Instances"])


def test_tags_refused_at_create_as_eucalyptus_answers(ec2_compat, client):
    ec2_compat.set(tags="refuse_on_create")
    status, code, message = error(lambda: run(client, TagSpecifications=TAGS))
    assert (status, code) == (400, "400 Bad Request")
    assert message.startswith("Failed to bind the following fields:") and "TagSpecification.1.ResourceType" in message
    assert ec2_compat.instances() == []
    ids = run(client)
    client.create_tags(Resources=ids, Tags=[{"Key": "glidein:launch", "Value": "run1.cms.0"}])
    assert listed(client, Filters=BY_TAG) == ids


def test_tags_dropped_everywhere(ec2_compat, client):
    ec2_compat.set(tags="drop")
    ids = run(client, TagSpecifications=TAGS)
    client.create_tags(Resources=ids, Tags=[{"Key": "glidein:state", "Value": "draining"}])  # succeeds
    assert [i["TagMap"] for i in ec2_compat.instances()] == [{}, {}]
    assert listed(client, Filters=BY_TAG) == [] and listed(client) == ids


def test_filters_ignored_return_everything(ec2_compat, client):
    ours = run(client, n=1, TagSpecifications=TAGS)
    other = run(client, n=1)
    client.terminate_instances(InstanceIds=other)
    live = [{"Name": "instance-state-name", "Values": ["pending", "running"]}]
    assert listed(client, Filters=BY_TAG + live) == ours
    ec2_compat.set(ignore_filters=True)
    assert listed(client, Filters=BY_TAG + live) == sorted(ours + other)


def test_max_per_call_cuts_max_count_and_fails_below_min_count(ec2_compat, client):
    ec2_compat.set(max_per_call=2)
    assert len(client.run_instances(ImageId=AMI, MinCount=1, MaxCount=5)["Instances"]) == 2
    status, code, message = error(lambda: client.run_instances(ImageId=AMI, MinCount=3, MaxCount=5))
    assert (status, code) == (503, "InsufficientInstanceCapacity")
    assert message == "Not enough resources (2 in default < 3): vm instances."
    assert len(ec2_compat.instances()) == 2


def test_terminate_answers_success_and_leaves_a_seeded_share_running(ec2_compat, client):
    ids = run(client, n=20)
    ec2_compat.set(terminate_noop=1.0)
    answer = client.terminate_instances(InstanceIds=ids[:2])["TerminatingInstances"]
    assert {i["CurrentState"]["Name"] for i in answer} == {"shutting-down"}
    assert len(ec2_compat.instances()) == 20

    def kept(seed: int) -> set[str]:
        ec2_compat.set(terminate_noop=0.5, seed=seed)
        answer = client.terminate_instances(InstanceIds=ids)["TerminatingInstances"]
        assert sorted(i["InstanceId"] for i in answer) == ids
        return {i["InstanceId"] for i in ec2_compat.instances()}

    left = kept(seed=7)
    assert 0 < len(left) < 20  # some ended, some ignored the call
    assert {i["InstanceId"] for i in ec2_compat.instances(live_only=False)} >= set(ids)


def test_throttle_answers_request_limit_exceeded(ec2_compat, client):
    ec2_compat.set(throttle=0.3, seed=3)
    outcomes = []
    for _ in range(40):
        try:
            client.describe_instances()
            outcomes.append("ok")
        except ClientError as exc:
            outcomes.append((exc.response["ResponseMetadata"]["HTTPStatusCode"], exc.response["Error"]["Code"]))
    refused = [o for o in outcomes if o != "ok"]
    assert set(refused) == {(503, "RequestLimitExceeded")}
    assert len(refused) == ec2_compat.throttle.refused and 0 < len(refused) < 40
    assert [c.status for c in ec2_compat.calls].count(503) == len(refused)

    ec2_compat.set(throttle=0, throttle_limit=3, throttle_window=60)
    for _ in range(3):
        client.describe_instances()
    assert error(client.describe_instances)[1] == "RequestLimitExceeded"


def test_switches_flip_from_another_process_and_reset(ec2_compat, client):
    script = ("import json, sys, urllib.request\n"
              "req = urllib.request.Request(sys.argv[1], data=json.dumps({'lag': 30, 'client_token': 'ignore'})"
              ".encode(), method='POST')\n"
              "print(urllib.request.urlopen(req).read().decode())")
    out = subprocess.run([sys.executable, "-c", script, f"{ec2_compat.url}/ec2-compat/switches"],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    assert json.loads(out)["lag"] == 30 and ec2_compat.switches.client_token == "ignore"
    run(client)
    assert listed(client) == []  # lagging now

    bad = urllib.request.Request(f"{ec2_compat.url}/ec2-compat/switches", data=b'{"lag": -1}', method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(bad)
    assert info.value.code == 400 and "lag" in json.loads(info.value.read())["error"]
    with pytest.raises(ValueError, match="unknown switch"):
        ec2_compat.set(lagg=3)

    reset = urllib.request.Request(f"{ec2_compat.url}/ec2-compat/reset", data=b"", method="POST")
    assert json.loads(urllib.request.urlopen(reset).read())["client_token"] == "aws"
    assert ec2_compat.switches.lag == 0 and ec2_compat.instances() == [] and listed(client) == []
