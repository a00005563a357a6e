"""Two endpoints whose ids collide (tests/servers/fixtures.py): oned, Nova and schedds, through the hooks.

Each pair's entries and credentials are what a config holds; the hooks reach
each endpoint through its own Airflow connection, and both endpoints hand out
the same provider ids for different pilots.
"""

from __future__ import annotations

import pytest

from airflow_glidein import pilots as P
from airflow_glidein.config import Entry, parse_config
from airflow_glidein.hooks import LaunchSpec, pilot_hook
from tests.servers.common import signed_envelope

FACTORY = "pair-factory"


def launch(pair, side: int, count: int = 2) -> list[str]:
    entry = Entry(**pair.entries[side])
    env = signed_envelope(entry.middleware, {"factory": FACTORY, "entry": entry.name, "launch_id": "r1.cms.0"})
    spec = LaunchSpec(launch_id=f"r1.cms.{entry.name}.0", frontend="cms", count=count, image=entry.image or "",
                      userdata=env, request="c1")
    return pilot_hook(entry, FACTORY, pair.conn_ids[side]).launch(spec)["created"]


def held(pair, side: int) -> dict[str, str]:
    """Provider id -> the entry its pilot was made for, read at that endpoint's server."""
    server = pair.servers[side]
    if pair.middleware == "opennebula":
        return {str(v["ID"]): v["USER_TEMPLATE"]["GLIDEIN_ENTRY"] for v in server.live()}
    if pair.middleware == "openstack":
        return {s["id"]: s["metadata"][P.TAG_ENTRY] for s in server.live()}
    return {f"{c}.{p}": str(ad["GlideinEntry"]) for (c, p), ad in server.jobs.items()}


@pytest.mark.parametrize("fixture", ["one_pair", "nova_pair", "schedd_pair"])
def test_two_endpoints_hand_out_the_same_ids_for_different_pilots(fixture, request):
    pair = request.getfixturevalue(fixture)
    a, b = launch(pair, 0), launch(pair, 1)
    assert a == b and len(set(a)) == 2  # the very same provider ids ...
    assert held(pair, 0) == dict.fromkeys(a, pair.entry_names[0])  # ... for pilots of different entries
    assert held(pair, 1) == dict.fromkeys(b, pair.entry_names[1])
    if fixture == "one_pair":
        assert a == ["0", "1"]
    if fixture == "schedd_pair":
        assert a == ["1.0", "1.1"]


@pytest.mark.parametrize("fixture", ["one_pair", "nova_pair", "schedd_pair"])
def test_a_pairs_entries_and_credentials_make_a_valid_config(fixture, request):
    pair = request.getfixturevalue(fixture)
    config = parse_config({
        "factory": {"name": FACTORY, "bootstrap_url": "http://127.0.0.1:8080/glidein", "collector": None},
        "entries": pair.entries,
        "frontends": [{"name": "cms", "schedule": None, "demand": {"queue_file": "queue.json"},
                       "match_expr": "stringListMember(glidein.GLIDEIN_Site, job.DESIRED_Sites)",
                       "entries": pair.entry_names, "credentials": pair.credential_ids}],
        "credentials": pair.credentials,
    })
    assert [e.api_endpoint for e in config.entries] == pair.entry_names  # one budget and pool each
    assert {c.conn_id for c in config.credentials if c.purpose == "provision"} == set(pair.conn_ids)
