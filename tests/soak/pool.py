"""An HTCondor pool stand-in that works across processes: tests/standins/condor.py behind a loopback service.

The Airflow processes (frontends querying schedds, the factory reading startd
ads and retiring pilots) reach it through a test-only patch of ``htcondor2``
loaded from the soak's own site folder (``site/glidein_soak_condor.py``); the
pilots' startd stand-in (``startd.py``) advertises, claims jobs and reads its
commands through the same service. One lock guards the pool: calls are short.
Everything is evaluated by the in-process stand-in with the real classad2.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import classad2
import htcondor2

from tests.standins import condor

ADDRESS = "soak-collector.test:9618"


class PoolService:
    def __init__(self) -> None:
        self.pool = condor.Pool(ADDRESS)
        condor._POOLS[ADDRESS] = self.pool  # the stand-in's Collector/Schedd classes find it by address
        self.lock = threading.RLock()
        self.pending: dict[str, list[str]] = {}  # startd Name -> commands not yet read by it
        self.finished: list[dict[str, Any]] = []  # completed jobs: {"schedd", "job", "pilot", "at"}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                try:
                    with outer.lock:
                        result = {"ok": getattr(outer, "op_" + body["op"].replace(".", "_"))(**body["args"])}
                except htcondor2.HTCondorException as exc:
                    result = {"error": str(exc)}
                data = json.dumps(result).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> PoolService:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.pool.close()

    # -- what the htcondor2 patch calls (ads travel as ClassAd text; classad2 parses them back)
    def op_collector_query(self, ad_type: int, constraint: str | None, projection: list[str]) -> list[str]:
        ads = condor.Collector(ADDRESS).query(htcondor2.AdType(ad_type), constraint, projection or None)
        return [str(ad) for ad in ads]

    def op_collector_locate(self, daemon_type: int, name: str | None) -> str:
        return str(condor.Collector(ADDRESS).locate(htcondor2.DaemonType(daemon_type), name))

    def op_collector_locateAll(self, daemon_type: int) -> list[str]:
        return [str(ad) for ad in condor.Collector(ADDRESS).locateAll(htcondor2.DaemonType(daemon_type))]

    def op_schedd_query(self, address: str, constraint: str, projection: list[str], opts: int, limit: int) -> list[str]:
        sd = condor.Schedd(classad2.ClassAd({"MyAddress": address}))
        return [str(ad) for ad in sd.query(constraint, projection, None, limit, htcondor2.QueryOpt(opts))]

    def op_schedd_act(self, address: str, action: str, job_spec: Any, reason: str | None) -> str:
        sd = condor.Schedd(classad2.ClassAd({"MyAddress": address}))
        return str(sd.act(htcondor2.JobAction[action], job_spec, reason))

    def op_send_command(self, address: str, name: str, command: str) -> None:
        if not any(a.get("MyAddress") == address for a in self.pool.startds):
            raise htcondor2.HTCondorException(f"Failed to send {command} to {name}: no daemon at {address}")
        self.pool.commands.append((command, name))
        self.pending.setdefault(name, []).append(command)

    # -- what a pilot's startd stand-in calls
    def op_startd_advertise(self, ad: str) -> None:
        new = classad2.parseOne(ad)
        self.pool.startds = [a for a in self.pool.startds if a.get("Name") != new["Name"]] + [new]

    def op_startd_invalidate(self, name: str) -> None:
        self.pool.startds = [a for a in self.pool.startds if a.get("Name") != name]

    def op_startd_commands(self, name: str) -> list[str]:
        return self.pending.pop(name, [])

    def op_startd_claim(self, name: str) -> dict | None:
        """The oldest idle job this startd's START accepts (and that wants its site); marked running."""
        me = next((a for a in self.pool.startds if a.get("Name") == name), None)
        if me is None:
            return None
        start = classad2.ExprTree(str(me.lookup("START")))
        for sd in self.pool.schedds.values():
            for (cluster, proc), job in sorted(sd.jobs.items()):
                if job["JobStatus"] != condor.IDLE:
                    continue
                if me.get("GLIDEIN_Site") not in str(job.get("DESIRED_Sites", "")).split(","):
                    continue
                if start.eval(me, job) is not True:
                    continue
                job["JobStatus"] = condor.RUNNING
                job["RemoteHost"] = name
                return {"schedd": sd.name, "job": f"{cluster}.{proc}", "runtime": job.get("SoakRuntime", 30)}
        return None

    def op_job_done(self, schedd: str, job: str, pilot: str) -> None:
        sd = self.pool.schedds[schedd]
        cluster, proc = (int(x) for x in job.split("."))
        sd.jobs.pop((cluster, proc), None)
        self.finished.append({"schedd": schedd, "job": job, "pilot": pilot, "at": time.time()})

    def op_job_requeue(self, schedd: str, job: str) -> None:
        """A pilot that died while running a job: it goes back to idle, as a real schedd does."""
        cluster, proc = (int(x) for x in job.split("."))
        ad = self.pool.schedds[schedd].jobs.get((cluster, proc))
        if ad is not None:
            ad["JobStatus"] = condor.IDLE

    # -- what the soak's driver does, in this process
    def add_jobs(self, schedd: str, count: int, attrs: dict[str, Any]) -> None:
        with self.lock:
            self.pool.schedds[schedd].add_jobs(attrs, count)

    def counts(self) -> dict[str, dict[str, int]]:
        with self.lock:
            return {name: {"idle": sum(j["JobStatus"] == condor.IDLE for j in sd.jobs.values()),
                           "running": sum(j["JobStatus"] == condor.RUNNING for j in sd.jobs.values())}
                    for name, sd in self.pool.schedds.items()}

    def startd_names(self) -> list[str]:
        with self.lock:
            return [str(a.get("Name")) for a in self.pool.startds]
