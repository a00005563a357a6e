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
import logging
from functools import cached_property
from typing import Any

from airflow_glidein import pilots as P
from airflow_glidein.hooks.base import LaunchSpec, PilotHook

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
        from airflow.providers.amazon.aws.hooks.ec2 import EC2Hook

        client = EC2Hook(api_type="client_type", aws_conn_id=self.conn_id, region_name=self.entry.region).conn
        client.meta.events.register("before-send.ec2", self._charge)
        return client

    def _charge(self, **_: Any) -> None:
        self.budget.acquire()  # returning None lets botocore send the request

    def _throttled(self, outcome: Any) -> float | None:
        return 0.0 if isinstance(outcome, Exception) and _error_code(outcome) in THROTTLING else None

    def _filters(self, launch_id: str | None) -> list[dict]:
        filters = [
            {"Name": f"tag:{P.TAG_FACTORY}", "Values": [self.factory]},
            {"Name": f"tag:{P.TAG_ENTRY}", "Values": [self.entry.name]},
            {"Name": "instance-state-name", "Values": LIVE_STATES},
        ]
        if launch_id:
            filters.append({"Name": f"tag:{P.TAG_LAUNCH}", "Values": [launch_id]})
        return filters

    def _list(self, launch_id: str | None = None) -> list[P.ProviderInstance]:
        def listing() -> list[P.ProviderInstance]:
            out = []
            pages = self.client.get_paginator("describe_instances").paginate(
                Filters=self._filters(launch_id), PaginationConfig={"PageSize": 1000}
            )
            for page in pages:
                for reservation in page.get("Reservations", []):
                    out.extend(_instance(i) for i in reservation.get("Instances", []))
            return out

        return self.api_call(listing, "describe_instances", charge=False)

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

    def test_connection(self) -> tuple[bool, str]:
        try:
            self.client.describe_instances(MaxResults=5)
            return True, "Connection successfully tested"
        except Exception as exc:
            return False, str(exc)


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


HOOK = EC2PilotHook
