"""condor_master for the soak's simulated VMs: a startd that joins the soak's pool stand-in and runs jobs.

Installed as ``condor_master`` on a simulated VM's PATH (HTCondor daemons cannot be installed here).
Like the real daemons it reads the configuration the startup script wrote (real htcondor2 bindings),
advertises one slot with the pilot's GLIDEIN_* attributes, claims jobs its START accepts, honours
STARTD_NOCLAIM_SHUTDOWN, the end of life (GLIDEIN_ToDie), a peaceful shutdown sent by the factory, and
SIGTERM (the VM shutting down), writes MasterLog and StartLog into $(LOG), and leaves the pool on exit.
It talks to the pool through GLIDEIN_SOAK_POOL_URL.
"""

import json
import os
import signal
import sys
import time
import urllib.request

POLL = float(os.environ.get("GLIDEIN_SOAK_STARTD_POLL", "2"))


def rpc(op, **args):
    req = urllib.request.Request(os.environ["GLIDEIN_SOAK_POOL_URL"] + "/rpc", method="POST",
                                 data=json.dumps({"op": op, "args": args}).encode())
    for attempt in range(30):
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                answer = json.loads(resp.read())
            break
        except OSError:
            time.sleep(1)
    else:
        raise SystemExit(f"the pool did not answer {op}")
    if "error" in answer:
        raise RuntimeError(answer["error"])
    return answer["ok"]


def main() -> int:
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append("SIGTERM"))
    import classad2
    import htcondor2

    p = htcondor2.param
    log_dir = p["LOG"]
    pilot = p["GLIDEIN_PILOT_ID"].strip('"')
    name = f"slot1@{pilot}"
    to_die = int(p["GLIDEIN_ToDie"])
    noclaim = int(p["STARTD_NOCLAIM_SHUTDOWN"])
    master_log = open(os.path.join(log_dir, "MasterLog"), "a", buffering=1)
    start_log = open(os.path.join(log_dir, "StartLog"), "a", buffering=1)

    def say(f, text):
        f.write(f"{time.strftime('%m/%d/%y %H:%M:%S')} {text}\n")

    say(master_log, f"condor_master (soak stand-in) starting for pilot {pilot}")
    ad = classad2.ClassAd()
    for key in ("GLIDEIN_PILOT_ID", "GLIDEIN_Entry_Name", "GLIDEIN_Frontend", "GLIDEIN_Factory", "GLIDEIN_Launch",
                "GLIDEIN_Site"):
        ad[key] = str(p[key]).strip('"')
    ad["Name"], ad["MyType"] = name, "Machine"
    ad["MyAddress"] = f"<127.0.0.1:9618?CCBID=soak#{pilot}>"
    ad["Cpus"], ad["Memory"] = int(p["NUM_CPUS"]), int(p["MEMORY"])
    ad["START"] = classad2.ExprTree(p["START"])
    ad["GLIDEIN_ToRetire"], ad["GLIDEIN_ToDie"] = int(p["GLIDEIN_ToRetire"]), to_die

    def advertise(state, activity):
        ad["State"], ad["Activity"], ad["EnteredCurrentState"] = state, activity, int(time.time())
        rpc("startd.advertise", ad=str(ad))
        say(start_log, f"slot1: {state}/{activity}")

    advertise("Unclaimed", "Idle")
    idle_since, retiring, why, jobs = time.time(), False, "", 0
    job = None
    while True:
        if stop:
            why = "SIGTERM: shutting down"
            break
        for cmd in rpc("startd.commands", name=name):
            say(master_log, f"got {cmd}")
            retiring = True
        now = time.time()
        if job and now >= job["until"]:
            rpc("job.done", schedd=job["schedd"], job=job["job"], pilot=pilot)
            say(start_log, f"job {job['schedd']}#{job['job']} completed")
            jobs, job = jobs + 1, None
            advertise("Unclaimed", "Idle")
            idle_since = now
        if job is None:
            if retiring:
                why = "peaceful shutdown"
                break
            if now >= to_die:
                why = "end of life (GLIDEIN_ToDie)"
                break
            if now - idle_since >= noclaim:
                why = f"STARTD_NOCLAIM_SHUTDOWN ({noclaim} s unclaimed)"
                break
            claimed = rpc("startd.claim", name=name)
            if claimed:
                job = {**claimed, "until": now + float(claimed["runtime"])}
                say(start_log, f"claimed job {claimed['schedd']}#{claimed['job']}")
                advertise("Claimed", "Busy")
                continue
        time.sleep(POLL)
    if job:
        rpc("job.requeue", schedd=job["schedd"], job=job["job"])
        say(start_log, f"job {job['schedd']}#{job['job']} evicted")
    rpc("startd.invalidate", name=name)
    say(master_log, f"condor_master exiting: {why}; {jobs} jobs completed")
    print(f"pilot {pilot}: {jobs} jobs, exit: {why}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
