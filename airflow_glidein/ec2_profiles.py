"""What an EC2-compatible endpoint honours: quirk profiles, and the launch markers built on them.

Here, not under hooks/, because config validation imports it (the hooks package imports Airflow).

Pure and Airflow-free (config validation and preflight read it). A profile is
a small frozen set of capabilities; the EC2 hook reads nothing else to decide
how to launch, find and end pilots:

- ``aws``: AWS itself. ClientToken makes RunInstances idempotent, tags are set
  at create (TagSpecifications) and filters honoured: the tags are the marker.
- ``eucalyptus``: ClientToken honoured (a known token returns its instances),
  tags exist but RunInstances refuses TagSpecifications (they are set after
  create with CreateTags), a few instances per call, terminate may do nothing.
- ``generic``: trust nothing but what every EC2 API has: no ClientToken, no
  tags (set after create where they stick, never relied on), filters ignored
  (every listing is filtered here), one instance per call, terminate may do
  nothing.

Where tags are not trusted at create, each launch gets its own key pair,
created BEFORE RunInstances and named for the factory, entry and launch (as
glideinWMS's EC2 GAHP names a key pair per job and finds its instances by key
name after a crash): a listing finds our instances by key name whatever the
endpoint does with tags and filters, and a call killed between create and
marking left instances that carry the marker already.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

RELIABLE, MAY_NOOP = "reliable", "may_noop"
KEY_PREFIX = "glidein"
KEY_NAME_MAX = 255  # EC2's limit on a key pair name


@dataclass(frozen=True)
class Profile:
    name: str
    client_token: bool  # a repeated RunInstances with the same ClientToken makes nothing new
    tags_on_create: bool  # RunInstances takes TagSpecifications
    tags: bool  # tags stick (CreateTags) and listings show them
    tag_filters: bool  # DescribeInstances honours Filters (tag:..., instance-state-name)
    max_per_call: int | None  # instances one RunInstances may make (None: no cap of its own)
    terminate: str  # RELIABLE, or MAY_NOOP: an answered terminate may leave the instance running

    @property
    def key_marker(self) -> bool:
        """Launches are marked by a key pair of their own (where the tags cannot be trusted from create)."""
        return not (self.tags_on_create and self.tags and self.tag_filters)

    def capabilities(self) -> dict[str, object]:
        return {"client_token": self.client_token, "tags_on_create": self.tags_on_create, "tags": self.tags,
                "tag_filters": self.tag_filters, "max_per_call": self.max_per_call, "terminate": self.terminate}


PROFILES = {
    "aws": Profile("aws", True, True, True, True, None, RELIABLE),
    "eucalyptus": Profile("eucalyptus", True, False, True, True, 5, MAY_NOOP),
    "generic": Profile("generic", False, False, False, False, 1, MAY_NOOP),
}


def default_profile(endpoint: str | None) -> str:
    """AWS (no endpoint named, or one of AWS's own EC2 hosts, as glideinWMS gatekeepers name them) honours
    everything; any other endpoint is an EC2-compatible cloud: assume nothing (generic)."""
    host = re.sub(r"^[a-z]+://", "", endpoint or "").split("/")[0].split(":")[0].lower()
    return "aws" if not host or host.endswith((".amazonaws.com", ".amazonaws.com.cn")) else "generic"


def resolve(options: dict, endpoint: str | None) -> Profile:
    """The entry's profile (``options.profile``, else the default), with its ``options.max_per_call``."""
    base = PROFILES[options.get("profile") or default_profile(endpoint)]
    cap = options.get("max_per_call")
    if cap:
        from dataclasses import replace

        return replace(base, max_per_call=int(cap))
    return base


def key_name(factory: str, entry: str, launch_id: str) -> str:
    """The launch's key pair: ``glidein.<factory>.<entry>.<launch id>`` (hashed past EC2's 255 characters)."""
    name = f"{entry_prefix(factory, entry)}{launch_id}"
    if len(name) <= KEY_NAME_MAX:
        return name
    return f"{entry_prefix(factory, entry)}~{hashlib.sha256(launch_id.encode()).hexdigest()[:32]}"


def entry_prefix(factory: str, entry: str) -> str:
    return f"{KEY_PREFIX}.{factory}.{entry}."


def client_token(launch_id: str, offset: int = 0) -> str:
    """ClientToken of the create call that brings the launch from ``offset`` instances: a retry that finds
    the same number made repeats the same token (the first call keeps the launch's original token)."""
    text = launch_id if offset == 0 else f"{launch_id}:{offset}"
    return hashlib.sha256(text.encode()).hexdigest()[:64]


def batches(count: int, cap: int | None) -> list[int]:
    """Sub-call sizes for ``count`` instances at ``cap`` per call."""
    if not cap or count <= cap:
        return [count] if count > 0 else []
    return [cap] * (count // cap) + ([count % cap] if count % cap else [])


def mismatches(profile: Profile, found: dict[str, object]) -> list[str]:
    """Where a probed capability says less than the profile assumes (what would break), one line each."""
    out = []
    for cap in ("client_token", "tags_on_create", "tags", "tag_filters"):
        if found.get(cap) is False and getattr(profile, cap):
            out.append(f"{cap}: the profile {profile.name} relies on it, the endpoint does not honour it")
    if found.get("terminate") == MAY_NOOP and profile.terminate == RELIABLE:
        out.append(f"terminate: the profile {profile.name} trusts it, the endpoint left an instance running")
    return out
