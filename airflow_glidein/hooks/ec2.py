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

What the endpoint honours is the entry's quirk profile (``options.profile``,
``airflow_glidein/ec2_profiles.py``). Where tags cannot be trusted from create,
each launch gets a key pair of its own, made before RunInstances: listings
keep the instances whose key name is one of our entry's launches (filtered
here, whatever the server does with Filters), their tags come from the
marker's record in the state store, tags are set after create where they
stick, a batch is split into calls of the profile's size, and the inventory
deletes a key pair once its instances are gone.
"""

from __future__ import annotations

import re
import logging
from functools import cached_property
from collections.abc import Callable
from typing import Any

from airflow_glidein import budget as B
from airflow_glidein import ec2_profiles as EP
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

    @cached_property
    def profile(self) -> EP.Profile:
        return EP.resolve(self.entry.options, self.entry.endpoint)

    def idempotent_create(self) -> bool:
        # A repeated RunInstances with the same ClientToken returns the first one's instances where the
        # profile says so; the aws profile by default (no options.profile) trusts it only at AWS itself.
        if not self.profile.client_token:
            return False
        return bool(self.entry.options.get("profile")) or "amazonaws.com" in (self.client.meta.endpoint_url or "")

    # -- launch markers (profiles without trustworthy tags) ----------------
    def _markers(self) -> dict[str, dict]:
        from airflow_glidein import pilotdb, state

        return pilotdb.load_markers(state.store(), self.entry.name)

    @cached_property
    def marker(self) -> Any:
        from airflow_glidein.hooks.ec2_markers import MARKERS

        return MARKERS[self.entry.options.get("marker") or "key_pair"](self)

    def _marked(self, launch_id: str | None, live: bool) -> Callable[[dict], str | None]:
        """The marker of a raw instance of our entry (of one launch), in live states; else None."""
        prefix = EP.entry_prefix(self.factory, self.entry.name)
        exact = EP.key_name(self.factory, self.entry.name, launch_id) if launch_id else None

        def keep(raw: dict) -> str | None:
            if live and raw.get("State", {}).get("Name") not in LIVE_STATES:
                return None
            for name in self.marker.of(raw):
                if (name == exact) if exact else name.startswith(prefix):
                    return name
            return None

        return keep

    def _list_marked(self, launch_id: str | None, live: bool = True) -> list[P.ProviderInstance]:
        filters = [{"Name": "instance-state-name", "Values": LIVE_STATES}] if live and self.profile.tag_filters else []
        markers = self._markers()
        prefix = EP.entry_prefix(self.factory, self.entry.name)
        out = []
        for inst, name in self._describe(keep=self._marked(launch_id, live), Filters=filters,
                                         PaginationConfig={"PageSize": 1000}):
            base = {P.TAG_FACTORY: self.factory, P.TAG_ENTRY: self.entry.name}
            if name in markers:
                base.update(markers[name]["tags"])
            elif not name.startswith(prefix + "~"):  # its record lost: the name still says the launch
                base[P.TAG_LAUNCH] = name[len(prefix):]
            inst.tags = {**base, **inst.tags}  # tags that stuck say the same; the marker fills the rest
            out.append(inst)
        return out

    def sanitize(self, instances: list[P.ProviderInstance]) -> list[P.ProviderInstance]:
        """The inventory's upkeep: delete launch markers no live instance carries any more, once their
        launch had its listing_grace (a young launch's instances may not be listed yet). Markers count
        against the account's quotas; ours are found at the provider too, records or not."""
        if not self.profile.key_marker:
            return instances
        from airflow_glidein import pilotdb, state

        prefix = EP.entry_prefix(self.factory, self.entry.name)
        used = {EP.key_name(self.factory, self.entry.name, i.launch_id) for i in instances if i.launch_id}
        markers = self._markers()
        at_provider = self.marker.at_provider(prefix)
        now = B.CLOCK.time()
        unused = [n for n in sorted(set(at_provider) | set(markers)) if n not in used and
                  (n not in markers or now - markers[n]["created"] >= self.entry.listing_grace)]
        gone = [n for n in unused if n not in at_provider or self.marker.delete(at_provider[n])]
        pilotdb.drop_markers(state.store(), self.entry.name, [n for n in gone if n in markers])
        if gone:
            log.info("Entry %s: deleted %d launch markers (%s) whose instances are gone: %s", self.entry.name,
                     len(gone), self.marker.kind, gone[:10])
        return instances

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

    def _describe(self, keep: Callable[[dict], str | None] | None = None, **params: Any) -> list:
        """Instances as listed; with ``keep``: (instance, marker) of those it keeps (filtered here)."""
        def listing() -> list:
            out: list = []
            pages = self.client.get_paginator("describe_instances").paginate(**params)
            for page in pages:
                for reservation in page.get("Reservations", []):
                    for raw in reservation.get("Instances", []):
                        if keep is None:
                            out.append(_instance(raw))
                        elif (name := keep(raw)) is not None:
                            out.append((_instance(raw), name))
            return out

        return self.api_call(listing, "describe_instances", charge=False)

    def _list(self, launch_id: str | None = None) -> list[P.ProviderInstance]:
        if self.profile.key_marker:
            return self._list_marked(launch_id)
        return self._describe(Filters=self._filters(launch_id), PaginationConfig={"PageSize": 1000})

    def _made(self, launch_id: str) -> list[P.ProviderInstance]:
        # EC2 keeps terminated instances listed for about an hour: count them too
        if self.profile.key_marker:
            return self._list_marked(launch_id, live=False)
        filters = [f for f in self._filters(launch_id) if f["Name"] != "instance-state-name"]
        return self._describe(Filters=filters, PaginationConfig={"PageSize": 1000})

    def listing_scope(self) -> tuple:
        return ("ec2", self.entry.region)

    def _list_all(self) -> list[P.ProviderInstance] | None:
        # one pass per region and account: every entry's pilots, split by their glidein:entry tag
        if self.profile.key_marker:
            return None  # found by each entry's key pairs instead
        return self._describe(Filters=self._filters(None, all_entries=True), PaginationConfig={"PageSize": 1000})

    def still_there(self, ids: list[str]) -> dict[str, P.ProviderInstance]:
        """Look the ids up directly (EC2 keeps terminated instances visible for a while):
        no listing of the whole entry. Ids EC2 no longer knows are gone."""
        out: dict[str, P.ProviderInstance] = {}
        todo = list(dict.fromkeys(ids))
        while todo:
            chunk, todo = todo[:1000], todo[1000:]
            try:
                asked = set(chunk)  # kept here too: an endpoint may answer more than it was asked
                found = [i for i in self._describe(InstanceIds=chunk) if i.id in asked]
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
            "UserData": spec.userdata,
            "InstanceInitiatedShutdownBehavior": "terminate",
        }
        tag_list = [{"Key": k, "Value": v} for k, v in tags.items()] + [{"Key": "Name", "Value": f"glidein-{self.entry.name}"}]
        if self.profile.tags_on_create:
            params["TagSpecifications"] = [{"ResourceType": "instance", "Tags": tag_list}]
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
        if self.profile.key_marker:  # the marker first: instances of a call killed mid-way carry it already
            name = EP.key_name(self.factory, self.entry.name, spec.launch_id)
            if self._log is not None:
                self._log.marking(self.marker.kind, name, tags, B.CLOCK.time())
            self.marker.make(name, params)
        made: list[P.ProviderInstance] = []
        offset = self._have  # instances the launch has before each call: its token says so
        sizes = EP.batches(count, self.profile.max_per_call)
        split = len(sizes) > 1
        while sizes:
            size = sizes.pop(0)
            self._sending(size)  # each call its own recorded outcome: an unanswered one stands for its own
            try:
                made += self._run(spec, {**params, "MinCount": size, "MaxCount": size,  # all or nothing per call
                                         "ClientToken": EP.client_token(spec.launch_id, offset)}, tag_list,
                                  record=split)
            except Exception as exc:
                room = _room(exc)
                if room is None or room >= size:
                    raise
                # Eucalyptus places at most ``room`` per call and made none (MinCount was above it)
                log.warning("Launch %s: the endpoint takes %d instances per call (options.max_per_call); "
                            "splitting", spec.launch_id, room)
                self._sent -= size if self._log is not None else 0
                sizes, split = EP.batches(size + sum(sizes), room), True
                continue
            offset += size
        return made

    def _run(self, spec: LaunchSpec, params: dict[str, Any], tag_list: list[dict],
             record: bool) -> list[P.ProviderInstance]:
        """One RunInstances; ``record``: its ids are recorded at once (one of several calls: a later one
        may fail), else the launch records them when _create returns."""
        try:
            resp = self.api_call(lambda: self.client.run_instances(**params), "run_instances", charge=False)
        except Exception as exc:
            if _error_code(exc) == "IdempotentParameterMismatch":
                # AWS already ran this launch's token with another count: the
                # instances exist and will show in the listing; make none.
                log.warning("Launch %s: token already used; not creating more", spec.launch_id)
                return []
            raise
        made = [_instance(i) for i in resp.get("Instances", [])]
        if record:
            self._created(made)
        if made and self.profile.tags and not self.profile.tags_on_create:
            try:  # informational where the key pair marks the launch; a new id may not be taggable yet
                self.api_call(lambda: self.client.create_tags(Resources=[i.id for i in made], Tags=tag_list),
                              "create_tags", charge=False)
            except Exception as exc:
                log.warning("Launch %s: tagging %d new instances failed (the key pair marks them): %s",
                            spec.launch_id, len(made), exc)
        return made

    def _terminate(self, ids: list[str]) -> None:
        for chunk in range(0, len(ids), 1000):
            part = ids[chunk : chunk + 1000]
            self.api_call(lambda: self.client.terminate_instances(InstanceIds=part), "terminate_instances",
                          charge=False)

    def entry_checks(self) -> list[tuple[str, Any]]:
        from airflow_glidein.hooks.ec2_probes import capability_checks

        return self._image_checks() + capability_checks(self, getattr(self, "probe_launch", False))

    def _image_checks(self) -> list[tuple[str, Any]]:
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


def _room(exc: Exception) -> int | None:
    """Instances per call an InsufficientInstanceCapacity names ("Not enough resources (2 in zone < 4)")."""
    if _error_code(exc) != "InsufficientInstanceCapacity":
        return None
    found = re.search(r"\((\d+) in \S+ < \d+\)", getattr(exc, "response", {}).get("Error", {}).get("Message", ""))
    return int(found.group(1)) or None if found else None


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
