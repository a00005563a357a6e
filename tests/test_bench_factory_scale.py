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
