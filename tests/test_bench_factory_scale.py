"""The scale benchmark and its moto launcher: the launcher answers tag lookups as moto does, the bench runs."""

import boto3
from moto import mock_aws
from moto.ec2.models.core import TaggedEC2Resource

from bench.moto_indexed_tags import indexed_get_tags


@mock_aws
def test_indexed_tag_lookup_answers_as_moto_does():
    ec2 = boto3.client("ec2", region_name="us-east-1")
    for entry in ("e1", "e2"):
        ec2.run_instances(ImageId="ami-1e749f67", MinCount=3, MaxCount=3, TagSpecifications=[{
            "ResourceType": "instance", "Tags": [{"Key": "glidein:entry", "Value": entry}, {"Key": "x", "Value": "1"}]}])
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    ec2.create_tags(Resources=[vpc], Tags=[{"Key": "Name", "Value": "v"}])
    from moto.backends import get_backend

    backend = get_backend("ec2")["123456789012"]["us-east-1"]
    resources = [i for r in backend.reservations.values() for i in r.instances] + [backend.vpcs[vpc]]
    assert len(resources) == 7
    for res in resources:
        assert indexed_get_tags(res) == TaggedEC2Resource.get_tags(res)
        assert indexed_get_tags(res)  # every one is tagged: the comparison is not of two empty lists
    assert len(backend.tags) == 7  # the lookup did not grow moto's tag store


def test_scale_bench_small_calls_do_not_grow_with_pilots():
    """The scale benchmark end to end at 200 and 400 pilots (the full run is `make bench`), so it cannot rot:
    the same number of API calls at both scales, every old pilot reaped and gone."""
    import re
    import subprocess
    import sys

    from tests.helpers import REPO

    out = subprocess.run([sys.executable, "-m", "bench.bench_factory_scale", "--pilots", "400", "--also", "200"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = {int(r[0]): (r[1], r[2], r[3], r[-1]) for r in (line.split() for line in out.stdout.splitlines())
            if len(r) == 10 and r[0].isdigit()}
    assert rows == {200: ("200", "20", "44", "0"), 400: ("400", "40", "44", "0")}  # listed, reaped, calls, left
    assert "goal: calls independent of pilots (met: [44, 44])" in out.stdout
    assert "every old pilot reaped and gone (met)" in out.stdout


def test_listing_standin_pages_lags_and_terminates():
    """The 100,000-pilot bench's stand-in answers as EC2 does where the factory looks: pages of at most
    MaxResults with a NextToken, new instances missing from listings (and unknown by id) for ``lag`` s,
    terminated ones left out by the state filter."""
    import boto3
    import botocore.exceptions
    import pytest

    from bench.ec2_listing_standin import EC2Listing

    ec2 = EC2Listing(lag=3600).start()
    try:
        client = boto3.client("ec2", region_name="us-east-1", endpoint_url=ec2.url, aws_access_key_id="k",
                              aws_secret_access_key="s")
        ec2.add([f"i-{n:017x}" for n in range(2500)], {"glidein:entry": "e1", "glidein:launch": "old"},
                listed_now=True)
        made = client.run_instances(ImageId="ami-1", MinCount=3, MaxCount=3, TagSpecifications=[{
            "ResourceType": "instance", "Tags": [{"Key": "glidein:entry", "Value": "e1"},
                                                 {"Key": "glidein:launch", "Value": "new"}]}])["Instances"]
        assert len(made) == 3 and made[0]["Tags"]
        live = [{"Name": "instance-state-name", "Values": ["pending", "running"]},
                {"Name": "tag:glidein:entry", "Values": ["e1"]}]
        pages = list(client.get_paginator("describe_instances").paginate(
            Filters=live, PaginationConfig={"PageSize": 1000}))
        sizes = [sum(len(r["Instances"]) for r in p["Reservations"]) for p in pages]
        assert sizes == [1000, 1000, 500]  # the three new ones lag
        assert not client.describe_instances(Filters=[{"Name": "tag:glidein:launch", "Values": ["new"]}])[
            "Reservations"][0]["Instances"]
        with pytest.raises(botocore.exceptions.ClientError, match="InvalidInstanceID.NotFound"):
            client.describe_instances(InstanceIds=[made[0]["InstanceId"]])
        client.terminate_instances(InstanceIds=["i-" + "0" * 17])
        listed = [i for p in client.get_paginator("describe_instances").paginate(Filters=live) for r in
                  p["Reservations"] for i in r["Instances"]]
        assert len(listed) == 2499
        assert ec2.stats()["live_per_launch"] == {"old": 2499, "new": 3} and ec2.stats()["hidden"] == 3
    finally:
        ec2.stop()


def _bench_100k(*args: str):
    import subprocess
    import sys

    from tests.helpers import REPO

    return subprocess.run([sys.executable, "-m", "bench.bench_factory_100k", "--pilots", "1000", "--entries", "20",
                           "--cycles", "2", *args], cwd=REPO, capture_output=True, text=True, timeout=900)


def test_factory_100k_bench_small_no_duplicates_under_lag():
    """The 100,000-pilot bench at 1,000 pilots on the stand-in (2 cycles under 30 s lag) and on moto:
    each cycle reaps and replaces a cohort, the second cycle begins with the first one's pilots unlisted,
    and no entry ends with a pilot more than its level. Its timing verdicts are printed, not judged here."""
    import re

    out = _bench_100k("--lag", "30", "--moto", "1000", "--moto-cycles", "1")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [r.split() for r in out.stdout.splitlines() if r.split()[:1] in (["standin"], ["moto"])]
    rows = [r for r in lines if len(r) == 16]  # a cycle each: server, pilots, cycle, hidden, known, made, reaped
    assert [(r[0], r[1], r[2], r[5], r[6]) for r in rows] == [
        ("standin", "1000", "0", "20", "20"), ("standin", "1000", "1", "20", "20"), ("moto", "1000", "0", "20", "20")]
    assert rows[0][3] == "0" and rows[1][3] == "20"  # the second cycle began with the first's 20 unlisted
    summary = {r[0]: r for r in lines if len(r) == 9}  # a scale each
    assert summary["standin"][-2:] == ["0", "0"] and summary["moto"][-2:] == ["0", "0"]  # duplicates, short
    assert "PASS  0 duplicates under listing lag: 0" in out.stdout
    assert "PASS  the lag was exercised (a cycle began with unlisted pilots): 20" in out.stdout
    assert re.search(r"(PASS|FAIL)  cycle <= 60 s at 1000 pilots \(median of 2\): [\d.]+ s", out.stdout)
    assert re.search(r"(PASS|FAIL)  peak RSS of a factory process <= 2 GiB: \d+ MiB", out.stdout)
    assert re.search(r"botocore's parsing [\d.]+ s of it; by step \(CPU s\): inventory [\d.]+, plan", out.stdout)
    assert "every entry holds its level, no more, and every reaped pilot is gone" in out.stdout


def test_factory_100k_bench_counts_duplicates_without_launch_records():
    """With listing_grace 0 the launch records do not hold the lagging pilots as capacity: the second cycle
    launches the first one's again, and the bench says so (its duplicate count is not blind)."""
    out = _bench_100k("--lag", "30", "--moto", "", "--listing-grace", "0")
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert "FAIL  0 duplicates under listing lag: 20" in out.stdout
