"""Preflight probes of what an EC2-compatible endpoint honours, against the entry's quirk profile.

Read-only calls and DryRun by default: DescribeInstances with a tag filter that
matches nothing (an answer with instances means filters are ignored),
RunInstances DryRun with TagSpecifications (DryRunOperation: tags at create
are taken), DescribeKeyPairs or DescribeSecurityGroups (the launch markers). With ``probe_launch`` one
small instance is asked for twice with one ClientToken (two instances: the
token is ignored), tagged, read back, terminated and checked (still running:
terminate may do nothing), and its key pair deleted. Each probe fills
``found``; the last check says whether it matches the profile.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from airflow_glidein import budget as B
from airflow_glidein import ec2_profiles as EP
from airflow_glidein import pilots as P

Check = tuple[str, Callable[[], tuple[bool, str]]]


def capability_checks(hook: Any, probe_launch: bool = False) -> list[Check]:
    found: dict[str, object] = {}
    client, profile = hook.client, hook.profile

    def ids(resp: dict) -> list[str]:
        return [i["InstanceId"] for r in resp.get("Reservations", []) for i in r.get("Instances", [])]

    def tag_filters() -> tuple[bool, str]:
        nonce = f"probe-{uuid.uuid4().hex[:12]}"
        matched = ids(client.describe_instances(Filters=[{"Name": f"tag:{P.TAG_FACTORY}", "Values": [nonce]}]))
        if matched:
            found["tag_filters"] = False
            return not profile.tag_filters, (f"a tag filter that matches nothing answered {len(matched)} instances: "
                                             "Filters are ignored (listings are filtered here)")
        if not ids(client.describe_instances()):
            return True, "no instance to filter: not determined"
        found["tag_filters"] = True
        return True, "honoured"

    def tags_on_create() -> tuple[bool, str]:
        try:
            client.run_instances(DryRun=True, ImageId=hook.entry.image, InstanceType=hook.entry.flavor, MinCount=1,
                                 MaxCount=1, TagSpecifications=[{"ResourceType": "instance", "Tags": [
                                     {"Key": P.TAG_FACTORY, "Value": hook.factory}]}])
        except Exception as exc:
            code, message = _error(exc)
            if code == "DryRunOperation":
                found["tags_on_create"] = True
                return True, "RunInstances DryRun with TagSpecifications: would succeed"
            if code == "UnauthorizedOperation":
                return True, "not determined: the credential may not run instances (DryRun refused)"
            found["tags_on_create"] = False
            return not profile.tags_on_create, f"refused: {code}: {' '.join(message.split())[:160]}"
        return True, "not determined: DryRun was not honoured (the endpoint answered as if it ran)"

    def markers() -> tuple[bool, str]:
        prefix = EP.entry_prefix(hook.factory, hook.entry.name)
        ours = hook.marker.at_provider(prefix)
        return True, f"{len(ours)} {hook.marker.kind} launch markers of this entry ({prefix}*)"

    def launch() -> tuple[bool, str]:
        return _launch_probe(hook, found)

    def matches() -> tuple[bool, str]:
        wrong = EP.mismatches(profile, found)
        caps = ", ".join(f"{k} {v}" for k, v in profile.capabilities().items())
        seen = ", ".join(f"{k} {v}" for k, v in sorted(found.items())) or "nothing determined"
        text = f"profile {profile.name} ({caps}); found: {seen}"
        if not hook.entry.options.get("profile") and not hook.idempotent_create() and profile.client_token:
            text += ("; the endpoint is not AWS's and no options.profile is set: ClientToken is not trusted, "
                     "set the profile the endpoint matches")
        return not wrong, text + ("; " + "; ".join(wrong) if wrong else "")

    checks: list[Check] = [("tag filters", tag_filters), ("tags at create (DryRun)", tags_on_create),
                           ("launch markers", markers)]
    if probe_launch:
        checks.append(("launch probe (one instance, ClientToken twice, terminate)", launch))
    return [*checks, (f"capabilities match profile {profile.name}", matches)]


def _launch_probe(hook: Any, found: dict[str, object]) -> tuple[bool, str]:
    client, profile = hook.client, hook.profile
    launch_id = f"probe-{uuid.uuid4().hex[:12]}"
    key = EP.key_name(hook.factory, hook.entry.name, launch_id)
    params: dict[str, Any] = {"ImageId": hook.entry.image, "InstanceType": hook.entry.flavor, "MinCount": 1,
                              "MaxCount": 1, "ClientToken": EP.client_token(launch_id),
                              "InstanceInitiatedShutdownBehavior": "terminate"}
    hook.marker.make(key, params)  # the marker first, as a launch does: a crash leaves it findable
    made: list[str] = []
    notes = []
    try:
        for _ in range(2):
            made += [i["InstanceId"] for i in client.run_instances(**params).get("Instances", [])]
        made = list(dict.fromkeys(made))
        found["client_token"] = len(made) == 1
        notes.append(f"the same ClientToken twice made {len(made)} instance{'s' * (len(made) > 1)}")
        try:
            client.create_tags(Resources=made, Tags=[{"Key": P.TAG_LAUNCH, "Value": launch_id}])
            seen = client.describe_instances(InstanceIds=made)
            tagged = [i for r in seen["Reservations"] for i in r["Instances"]
                      if {"Key": P.TAG_LAUNCH, "Value": launch_id} in i.get("Tags", [])]
            found["tags"] = bool(tagged)
            notes.append("tags stick" if tagged else "tags accepted and dropped")
        except Exception as exc:
            notes.append(f"tags not determined ({_error(exc)[0]})")
    finally:
        if made:
            client.terminate_instances(InstanceIds=made)
            B.CLOCK.sleep(float(hook.entry.options.get("terminate_settle", hook.terminate_settle)))
            running = [i["InstanceId"] for r in client.describe_instances(InstanceIds=made)["Reservations"]
                       for i in r["Instances"] if i["State"]["Name"] in ("pending", "running")]
            found["terminate"] = EP.MAY_NOOP if running else EP.RELIABLE
            if running:
                client.terminate_instances(InstanceIds=running)
                notes.append(f"terminate left {running} running (asked again; check them)")
            else:
                notes.append("terminate acted")
        for name, handle in hook.marker.at_provider(key).items():
            if name == key:
                hook.marker.delete(handle)
    return True, "; ".join(notes) + f" (profile {profile.name})"


def _error(exc: Exception) -> tuple[str, str]:
    err = getattr(exc, "response", {}).get("Error", {})
    return err.get("Code", type(exc).__name__), err.get("Message", str(exc))
