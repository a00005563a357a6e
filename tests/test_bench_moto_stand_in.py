"""The scale benchmark's moto launcher must answer tag lookups exactly as moto does, only faster."""

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
