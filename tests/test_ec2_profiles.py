"""EC2 quirk profiles: validation, the capability logic, preflight's probes and the hook on the endpoints they
describe (the EC2-compatible proxy of tests/servers/ec2_compat.py set as Eucalyptus or a generic cloud)."""

from __future__ import annotations

import pytest

from airflow_glidein import ec2_profiles as EP
from airflow_glidein import pilots as P
from airflow_glidein.config import ConfigError, parse_config
from tests.helpers import example_config

EUCALYPTUS = {"client_token": "eucalyptus", "tags": "refuse_on_create", "max_per_call": 2}
GENERIC = {"client_token": "ignore", "tags": "drop", "ignore_filters": True, "max_per_call": 1}


def entry_with(options: dict, **entry):
    cfg = example_config()
    cfg["entries"][0].update(options=options, **entry)
    return cfg


@pytest.mark.parametrize("options, message", [
    ({"profile": "openstack"}, "entries[aws-us-east-1].options.profile: unknown profile 'openstack'; known: aws, "
                               "eucalyptus, generic"),
    ({"profile": "eucalyptus", "max_per_call": 0}, "entries[aws-us-east-1].options.max_per_call: Input should be "
                                                   "greater than or equal to 1"),
    ({"profile": "generic", "key_name": "site-key"}, "entries[aws-us-east-1]: options.key_name cannot be set with "
                                                     "profile generic"),
])
def test_a_bad_profile_names_file_entry_and_field(options, message):
    with pytest.raises(ConfigError) as err:
        parse_config(entry_with(options), "site.yaml")
    assert str(err.value).startswith(f"site.yaml: {message}")


def test_profiles_resolve_by_option_then_by_endpoint():
    assert EP.resolve({}, None).name == "aws"  # AWS's own regions
    assert EP.resolve({}, "euca-site").name == "generic"  # a cloud that names its endpoint: assume nothing
    euca = EP.resolve({"profile": "eucalyptus", "max_per_call": 8}, "euca-site")
    assert (euca.name, euca.max_per_call, euca.client_token, euca.tags_on_create) == ("eucalyptus", 8, True, False)
    assert not EP.PROFILES["aws"].key_marker and EP.PROFILES["eucalyptus"].key_marker
    parse_config(entry_with({"profile": "aws", "key_name": "site-key"}), "site.yaml")  # tags mark aws launches
    parse_config(entry_with({"profile": "generic", "key_name": "site-key", "marker": "security_group"}), "site.yaml")
    with pytest.raises(ConfigError, match="key_name cannot be set with profile generic"):
        parse_config(entry_with({"key_name": "site-key"}, endpoint="euca-site"), "site.yaml")


def test_batches_tokens_and_key_names():
    assert EP.batches(5, 2) == [2, 2, 1] and EP.batches(5, None) == [5] and EP.batches(0, 2) == []
    # a retry that finds 2 made repeats the second call's token, not the first's
    assert EP.client_token("L", 0) != EP.client_token("L", 2) == EP.client_token("L", 2)
    assert EP.key_name("f", "e", "run.cms.0") == "glidein.f.e.run.cms.0"
    long = EP.key_name("f", "e", "x" * 300)
    assert len(long) <= 255 and long.startswith("glidein.f.e.~")
    found = {"client_token": False, "tags": True, "terminate": EP.MAY_NOOP}
    assert EP.mismatches(EP.PROFILES["generic"], found) == []
    assert [m.split(":")[0] for m in EP.mismatches(EP.PROFILES["aws"], found)] == ["client_token", "terminate"]


def probes(ec2_compat, options, probe_launch=False, **switches):
    from airflow_glidein.hooks.ec2 import EC2PilotHook

    ec2_compat.set(**switches)
    cfg = parse_config(entry_with(options), "site.yaml")
    hook = EC2PilotHook(entry=cfg.entries[0], factory=cfg.factory.name, conn_id="glidein_aws_test")
    hook.probe_launch = probe_launch
    return {what: (ok, detail) for what, ok, detail in hook.preflight()}


def test_preflight_finds_eucalyptus_semantics_and_checks_them_against_the_profile(ec2_compat):
    ec2_compat.client().run_instances(ImageId="ami-1e749f67", MinCount=1, MaxCount=1)  # something to filter
    found = probes(ec2_compat, {"profile": "eucalyptus"}, **EUCALYPTUS)
    assert found["tag filters"] == (True, "honoured")
    ok, detail = found["tags at create (DryRun)"]
    assert ok and detail.startswith("refused: 400 Bad Request: Failed to bind the following fields")
    assert found["capabilities match profile eucalyptus"][0]
    ok, detail = probes(ec2_compat, {"profile": "aws"}, **EUCALYPTUS)["capabilities match profile aws"]
    assert not ok and "tags_on_create: the profile aws relies on it, the endpoint does not honour it" in detail


def test_preflight_sees_a_generic_cloud_and_launches_only_when_asked(ec2_compat):
    ec2_compat.client().run_instances(ImageId="ami-1e749f67", MinCount=1, MaxCount=1)
    found = probes(ec2_compat, {"profile": "aws"}, **GENERIC)
    assert not found["tag filters"][0] and "Filters are ignored" in found["tag filters"][1]
    assert not any(what.startswith("launch probe") for what in found)
    before = len(ec2_compat.instances(live_only=False))
    found = probes(ec2_compat, {"profile": "generic"}, probe_launch=True, terminate_noop=1.0, **GENERIC)
    ok, detail = found["launch probe (one instance, ClientToken twice, terminate)"]
    assert ok and "the same ClientToken twice made 2 instances" in detail and "tags accepted and dropped" in detail
    assert "terminate left" in detail
    ok, detail = found["capabilities match profile generic"]
    assert ok and "client_token False" in detail and "terminate may_noop" in detail
    assert len(ec2_compat.instances(live_only=False)) == before + 2
    assert ec2_compat.client().describe_key_pairs()["KeyPairs"] == []  # the probe's marker is gone
    assert found["launch markers"][1].startswith("0 key_pair launch markers of this entry (glidein.")
    ok, detail = probes(ec2_compat, {"profile": "eucalyptus"}, probe_launch=True, **GENERIC)[
        "capabilities match profile eucalyptus"]
    assert not ok and "client_token: the profile eucalyptus relies on it" in detail


def test_a_generic_launch_is_found_by_its_key_pair_split_per_call_and_tagged_where_tags_stick(ec2_compat):
    from airflow_glidein.hooks.base import LaunchSpec
    from airflow_glidein.hooks.ec2 import EC2PilotHook

    ec2_compat.client().run_instances(ImageId="ami-1e749f67", MinCount=2, MaxCount=2)  # not ours
    ec2_compat.set(**GENERIC)
    cfg = parse_config(entry_with({"profile": "generic"}), "site.yaml")
    hook = EC2PilotHook(entry=cfg.entries[0], factory=cfg.factory.name, conn_id="glidein_aws_test")
    spec = LaunchSpec("run1.cms.0", "cms", 3, "ami-1e749f67", "#!/bin/sh\n")
    ec2_compat.calls.clear()
    result = hook.launch(spec)
    assert len(result["created"]) == 3
    runs = [c for c in ec2_compat.calls if c.path == "RunInstances"]
    assert len(runs) == 3  # one per instance, as the profile says
    listed = hook.list_pilots()
    assert sorted(i.id for i in listed) == sorted(result["created"])  # only ours, filters ignored or not
    assert {i.launch_id for i in listed} == {"run1.cms.0"}
    assert hook.launch(spec) == {"existing": sorted(result["created"]), "created": []}


def test_preflight_asks_for_a_profile_where_the_default_meets_another_endpoint(ec2_compat):
    ok, detail = probes(ec2_compat, {})["capabilities match profile aws"]
    assert ok and "the endpoint is not AWS's and no options.profile is set" in detail


def test_a_security_group_marks_the_launch_where_the_site_keeps_its_key_name(ec2_compat, monkeypatch):
    from airflow_glidein import budget
    from airflow_glidein.hooks.base import LaunchSpec
    from airflow_glidein.hooks.ec2 import EC2PilotHook

    client = ec2_compat.client()
    client.import_key_pair(KeyName="site-key", PublicKeyMaterial=marker_key())
    client.run_instances(ImageId="ami-1e749f67", MinCount=1, MaxCount=1)  # not ours
    ec2_compat.set(**GENERIC)
    cfg = parse_config(entry_with({"profile": "generic", "marker": "security_group", "key_name": "site-key"},
                                  listing_grace=0), "site.yaml")
    hook = EC2PilotHook(entry=cfg.entries[0], factory=cfg.factory.name, conn_id="glidein_aws_test")
    result = hook.launch(LaunchSpec("run1.cms.0", "cms", 2, "ami-1e749f67", "#!/bin/sh\n"))
    listed = hook.list_pilots()
    assert sorted(i.id for i in listed) == sorted(result["created"]) and {i.launch_id for i in listed} == {"run1.cms.0"}
    raw = [i for i in ec2_compat.instances() if i["InstanceId"] in result["created"]]
    assert {i["KeyName"] for i in raw} == {"site-key"}  # the site's key stays
    group = EP.key_name(cfg.factory.name, cfg.entries[0].name, "run1.cms.0")
    assert hook.sanitize(listed) == listed and group in groups(client)  # in use: kept
    client.terminate_instances(InstanceIds=result["created"])
    monkeypatch.setattr(budget, "CLOCK", type("Later", (), {"time": lambda self: 1e12, "sleep": lambda self, s: None})())
    hook.sanitize(hook.list_pilots())
    assert group not in groups(client)


def groups(client) -> list[str]:
    return [g["GroupName"] for g in client.describe_security_groups()["SecurityGroups"]]


def marker_key() -> bytes:
    from airflow_glidein.hooks.ec2_markers import marker_public_key

    return marker_public_key()


def test_a_call_above_what_eucalyptus_places_is_split_to_its_size(ec2_compat):
    """The profile says 5 per call, the endpoint places 2 and refuses more (making none): the batch goes
    in calls of 2, each with its own token, and the launch has exactly its 5."""
    from airflow_glidein.hooks.base import LaunchSpec
    from airflow_glidein.hooks.ec2 import EC2PilotHook

    ec2_compat.set(**EUCALYPTUS)
    cfg = parse_config(entry_with({"profile": "eucalyptus"}), "site.yaml")
    hook = EC2PilotHook(entry=cfg.entries[0], factory=cfg.factory.name, conn_id="glidein_aws_test")
    result = hook.launch(LaunchSpec("run1.cms.0", "cms", 5, "ami-1e749f67", "#!/bin/sh\n"))
    assert len(result["created"]) == 5 == len(ec2_compat.instances())
    made = [c.status for c in ec2_compat.calls if c.path == "RunInstances"]
    assert made.count(200) == 3 and set(made) <= {200, 503}  # 2 + 2 + 1 after the refusals
    assert hook.launch(LaunchSpec("run1.cms.0", "cms", 5, "ami-1e749f67", "#!/bin/sh\n"))["created"] == []


def test_the_default_profile_is_aws_at_aws_own_endpoints_and_generic_elsewhere():
    from airflow_glidein.ec2_profiles import default_profile

    assert default_profile(None) == "aws"
    assert default_profile("ec2.us-east-1.amazonaws.com") == "aws"  # as import-gwms writes a gatekeeper
    assert default_profile("https://ec2.cn-north-1.amazonaws.com.cn/") == "aws"
    assert default_profile("https://euca.example.org:8773/services/compute") == "generic"
    assert default_profile("amazonaws.com.evil.example") == "generic"
