"""EC2 pilots through the Amazon provider's EC2Hook and an Airflow ``aws`` connection.

Batches use MinCount/MaxCount; instances are tagged at creation
(TagSpecifications, so tags and instance appear together) and launched with
InstanceInitiatedShutdownBehavior=terminate, so a pilot that powers itself
off stops costing money. ClientToken makes the call idempotent on AWS; other
EC2 APIs (and moto) ignore it, so the base class's check-before-create is
what makes a retry safe everywhere.

Every HTTP request botocore sends (retries included) takes a token of the
entry's API budget (a before-send event); calls that still end throttled
(RequestLimitExceeded and friends) back off in the base class.
"""

from __future__ import annotations

import hashlib
import re
import logging
from functools import cached_property
from typing import Any

from airflow_glidein import pilots as P
from airflow_glidein.hooks.base import LaunchSpec, PilotHook, conn_fingerprint, shared_client

log = logging.getLogger(__name__)

STATE = {
    "pending": P.P_PENDING,
    "running": P.P_RUNNING,
    "stopping": P.P_STOPPING,
    "stopped": P.P_STOPPED,
    "shutting-down": P.P_TERMINATING,
    "terminated": P.P_TERMINATED,
}
LIVE_STATES = ["pending", "running", "stopping", "stopped", "shutting-down"]
THROTTLING = {"RequestLimitExceeded", "Throttling", "ThrottlingException", "TooManyRequestsException",
              "SlowDown", "ServiceUnavailable", "Unavailable"}


class EC2PilotHook(PilotHook):
    middleware = "ec2"
    conn_name_attr = "aws_conn_id"
    default_conn_name = "aws_default"
    conn_type = "aws"
    hook_name = "Glidein pilots on EC2"

    @cached_property
    def client(self) -> Any:
        budget = self.budget
        key = ("ec2", conn_fingerprint(self.conn_id), self.entry.region, budget.endpoint, budget.requests,
               budget.per_seconds)
        return shared_client(key, lambda: self._new_client(budget))

    def _new_client(self, budget: Any) -> Any:
        from airflow.providers.amazon.aws.hooks.ec2 import EC2Hook

        client = EC2Hook(api_type="client_type", aws_conn_id=self.conn_id, region_name=self.entry.region).conn

        def charge(**_: Any) -> None:
            budget.acquire()  # every request takes a token; returning None lets botocore send it

        client.meta.events.register("before-send.ec2", charge)
        return client

    def _throttled(self, outcome: Any) -> float | None:
        return 0.0 if isinstance(outcome, Exception) and _error_code(outcome) in THROTTLING else None

    def _refused(self, exc: Exception) -> bool:
        status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return (400 <= status < 500 and _error_code(exc) not in THROTTLING) or super()._refused(exc)

    def idempotent_create(self) -> bool:
        # AWS honours ClientToken: a repeated RunInstances returns the instances the first one made.
        # Other EC2 APIs (and moto) may ignore it.
        return "amazonaws.com" in (self.client.meta.endpoint_url or "")

    def _filters(self, launch_id: str | None, all_entries: bool = False) -> list[dict]:
        filters = [
            {"Name": f"tag:{P.TAG_FACTORY}", "Values": [self.factory]},
            {"Name": "instance-state-name", "Values": LIVE_STATES},
        ]
        if not all_entries:
            filters.append({"Name": f"tag:{P.TAG_ENTRY}", "Values": [self.entry.name]})
        if launch_id:
            filters.append({"Name": f"tag:{P.TAG_LAUNCH}", "Values": [launch_id]})
        return filters

    def _describe(self, **params: Any) -> list[P.ProviderInstance]:
        def listing() -> list[P.ProviderInstance]:
            out = []
            pages = self.client.get_paginator("describe_instances").paginate(**params)
            for page in pages:
                for reservation in page.get("Reservations", []):
                    out.extend(_instance(i) for i in reservation.get("Instances", []))
            return out

        return self.api_call(listing, "describe_instances", charge=False)

    def _list(self, launch_id: str | None = None) -> list[P.ProviderInstance]:
        return self._describe(Filters=self._filters(launch_id), PaginationConfig={"PageSize": 1000})

    def _made(self, launch_id: str) -> list[P.ProviderInstance]:
        # EC2 keeps terminated instances listed for about an hour: count them too
        filters = [f for f in self._filters(launch_id) if f["Name"] != "instance-state-name"]
        return self._describe(Filters=filters, PaginationConfig={"PageSize": 1000})

    def listing_scope(self) -> tuple:
        return ("ec2", self.entry.region)

    def _list_all(self) -> list[P.ProviderInstance]:
        # one pass per region and account: every entry's pilots, split by their glidein:entry tag
        return self._describe(Filters=self._filters(None, all_entries=True), PaginationConfig={"PageSize": 1000})

    def still_there(self, ids: list[str]) -> dict[str, P.ProviderInstance]:
        """Look the ids up directly (EC2 keeps terminated instances visible for a while):
        no listing of the whole entry. Ids EC2 no longer knows are gone."""
        out: dict[str, P.ProviderInstance] = {}
        todo = list(dict.fromkeys(ids))
        while todo:
            chunk, todo = todo[:1000], todo[1000:]
            try:
                found = self._describe(InstanceIds=chunk)
            except Exception as exc:
                unknown = _unknown_ids(exc)
                if not unknown:
                    raise
                todo = [i for i in chunk if i not in unknown] + todo
                continue
            out.update({i.id: i for i in found if i.state != P.P_TERMINATED})
        return out

    def _create(self, spec: LaunchSpec, count: int, tags: dict[str, str]) -> list[P.ProviderInstance]:
        opts = self.entry.options
        params: dict[str, Any] = {
            "ImageId": spec.image,
            "InstanceType": self.entry.flavor,
            "MinCount": count,  # all or nothing: a batch is one launch id, one outcome
            "MaxCount": count,
            "UserData": spec.userdata,
            "ClientToken": hashlib.sha256(spec.launch_id.encode()).hexdigest()[:64],
            "InstanceInitiatedShutdownBehavior": "terminate",
            "TagSpecifications": [
                {"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]
                 + [{"Key": "Name", "Value": f"glidein-{self.entry.name}"}]}
            ],
        }
        for key, name in (("subnet_id", "SubnetId"), ("key_name", "KeyName"), ("security_group_ids", "SecurityGroupIds")):
            if opts.get(key):
                params[name] = opts[key]
        if opts.get("instance_profile"):
            params["IamInstanceProfile"] = {"Name": opts["instance_profile"]}
        if opts.get("spot"):
            # one-time spot: an interruption terminates the pilot (its jobs go back to the queue, the
            # inventory sees it gone); a capacity or price refusal is a launch error that backs the entry off
            spot: dict[str, Any] = {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}
            if opts.get("spot_max_price"):
                spot["MaxPrice"] = str(opts["spot_max_price"])
            params["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": spot}
        try:
            resp = self.api_call(lambda: self.client.run_instances(**params), "run_instances", charge=False)
        except Exception as exc:
            if _error_code(exc) == "IdempotentParameterMismatch":
                # AWS already ran this launch's token with another count: the
                # instances exist and will show in the listing; make none.
                log.warning("Launch %s: token already used; not creating more", spec.launch_id)
                return []
            raise
        return [_instance(i) for i in resp.get("Instances", [])]

    def _terminate(self, ids: list[str]) -> None:
        for chunk in range(0, len(ids), 1000):
            part = ids[chunk : chunk + 1000]
            self.api_call(lambda: self.client.terminate_instances(InstanceIds=part), "terminate_instances",
                          charge=False)

    def entry_checks(self) -> list[tuple[str, Any]]:
        def image() -> tuple[bool, str]:
            state = self.client.describe_images(ImageIds=[self.entry.image])["Images"][0].get("State")
            return state == "available", f"state {state}"

        def flavor() -> tuple[bool, str]:
            t = self.client.describe_instance_types(InstanceTypes=[self.entry.flavor])["InstanceTypes"][0]
            return self.cores_fit(t["VCpuInfo"]["DefaultVCpus"], t["MemoryInfo"]["SizeInMiB"])

        return [(f"image {self.entry.image}", image), (f"instance type {self.entry.flavor}", flavor)]

    def test_connection(self) -> tuple[bool, str]:
        try:
            self.client.describe_instances(MaxResults=5)
            return True, "Connection successfully tested"
        except Exception as exc:
            return False, str(exc)


def _unknown_ids(exc: Exception) -> set[str]:
    """The ids an InvalidInstanceID.NotFound error names ("The instance IDs 'i-1, i-2' do not exist")."""
    if _error_code(exc) != "InvalidInstanceID.NotFound":
        return set()
    message = getattr(exc, "response", {}).get("Error", {}).get("Message", "")
    return set(re.findall(r"i-[0-9a-f]+", message))


def _error_code(exc: Exception) -> str:
    return getattr(exc, "response", {}).get("Error", {}).get("Code", "")


def _instance(raw: dict) -> P.ProviderInstance:
    tags = {t["Key"]: t["Value"] for t in raw.get("Tags", [])}
    state = STATE.get(raw.get("State", {}).get("Name", ""), P.P_ERROR)
    launched = raw.get("LaunchTime")
    return P.ProviderInstance(
        id=raw["InstanceId"],
        state=state,
        launched=launched.timestamp() if launched is not None else 0.0,
        tags=tags,
        detail=raw.get("StateReason", {}).get("Message", ""),
    )
