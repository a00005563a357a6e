"""Test-only: makes ``htcondor2`` reach the soak's pool stand-in (tests/soak/pool.py) over loopback.

Loaded into the soak's Airflow processes by ``sitecustomize`` in this folder, which the soak puts on
their PYTHONPATH (never the repository root). The product calls htcondor2.Collector, htcondor2.Schedd
and htcondor2.send_command as it would against a real pool; these classes forward each call to the
service and hand back real classad2 ClassAds.
"""

from __future__ import annotations

import json
import os
import urllib.request
from typing import Any

import classad2
import htcondor2

URL = os.environ.get("GLIDEIN_SOAK_POOL_URL", "")


def _rpc(op: str, **args: Any) -> Any:
    req = urllib.request.Request(f"{URL}/rpc", data=json.dumps({"op": op, "args": args}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            answer = json.loads(resp.read())
    except OSError as exc:
        raise htcondor2.HTCondorException(f"Failed to contact the pool ({op}): {exc}") from None
    if "error" in answer:
        raise htcondor2.HTCondorException(answer["error"])
    return answer["ok"]


def _ads(texts: list[str]) -> list[classad2.ClassAd]:
    return [classad2.parseOne(t) for t in texts]


class Collector:
    def __init__(self, pool: Any = None, security: Any = None) -> None:
        self.pool = pool

    def query(self, ad_type=htcondor2.AdType.Any, constraint=None, projection=None, statistics=None):
        return _ads(_rpc("collector.query", ad_type=int(ad_type),
                         constraint=None if constraint is None else str(constraint), projection=list(projection or [])))

    def locate(self, daemon_type, name=None):
        return classad2.parseOne(_rpc("collector.locate", daemon_type=int(daemon_type), name=name))

    def locateAll(self, daemon_type):
        return _ads(_rpc("collector.locateAll", daemon_type=int(daemon_type)))


class Schedd:
    def __init__(self, location: classad2.ClassAd | None = None) -> None:
        if location is None:
            raise htcondor2.HTCondorException("the soak's pool needs a location ad (Collector.locate)")
        self.address = str(location["MyAddress"])

    def query(self, constraint="True", projection=[], callback=None, limit=-1, opts=htcondor2.QueryOpt.Default):
        ads = _ads(_rpc("schedd.query", address=self.address, constraint=str(constraint), projection=list(projection),
                        opts=int(opts), limit=limit))
        return [callback(ad) for ad in ads] if callback else ads

    def act(self, action, job_spec, reason=None):
        spec = job_spec if isinstance(job_spec, (str, int)) else [str(j) for j in job_spec]
        return classad2.parseOne(_rpc("schedd.act", address=self.address, action=action.name, job_spec=spec,
                                      reason=reason))


def send_command(ad, dc, target=None) -> None:
    _rpc("send_command", address=str(ad["MyAddress"]), name=str(ad["Name"]), command=dc.name)


def install() -> None:
    htcondor2.Collector = Collector
    htcondor2.Schedd = Schedd
    htcondor2.send_command = send_command
