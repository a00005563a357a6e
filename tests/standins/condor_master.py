"""Stand-in for condor_master: HTCondor daemons cannot be installed on these machines.

The test installs this file as ``condor_master`` on the wrapper's PATH. Like
the real one it is started as ``condor_master -f`` with CONDOR_CONFIG set; it
reads that configuration with the real htcondor2 bindings (so a file HTCondor
cannot parse fails here), checks START parses as a ClassAd expression, and
writes what it read to $(LOG)/StandinParams.json next to a MasterLog and a
StartLog, the way the real daemons fill $(LOG). It then exits, or with
STANDIN_MASTER_SLEEP waits until SIGTERM (a graceful shutdown) or the sleep ends.
STANDIN_MASTER_EXIT sets its exit status; STANDIN_MASTER_LOG_BYTES pads StartLog.
"""

import json
import os
import signal
import sys
import time

PARAMS = ["LOG", "LOCAL_DIR", "COLLECTOR_HOST", "CCB_ADDRESS", "START", "STARTD_NOCLAIM_SHUTDOWN",
          "STARTD_ATTRS", "NUM_CPUS", "MEMORY", "SEC_TOKEN_DIRECTORY", "GLIDEIN_PILOT_ID", "GLIDEIN_Entry_Name",
          "GLIDEIN_Frontend", "GLIDEIN_Factory", "GLIDEIN_Launch", "GLIDEIN_ToRetire", "GLIDEIN_ToDie",
          "GLIDEIN_Site", "DAEMON_LIST", "MASTER.DAEMON_SHUTDOWN", "STARTD.DAEMON_SHUTDOWN", "GLIDEIN_Instance_ID",
          "RELEASE_DIR", "SBIN"]


def main() -> int:
    # Like the real daemon it handles SIGTERM from the start (a stop during start-up is graceful) and a
    # second one while it shuts down: systemd signals the whole unit and the startup script passes the
    # signal on as well. (Python restores the default action while it exits; SIG_IGN stays.)
    stopped = []

    def on_term(*_):
        stopped.append("SIGTERM")
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    signal.signal(signal.SIGTERM, on_term)
    if sys.argv[1:] != ["-f"]:
        print(f"condor_master stand-in: expected '-f', got {sys.argv[1:]}", file=sys.stderr)
        return 2
    import classad2
    import htcondor2

    params = {k: htcondor2.param.get(k) for k in PARAMS}
    classad2.ExprTree(params["START"])  # raises if START is not a ClassAd expression
    token_dir = params["SEC_TOKEN_DIRECTORY"]
    tokens = sorted(os.listdir(token_dir)) if token_dir and os.path.isdir(token_dir) else []
    params["_token_files"] = tokens
    log = params["LOG"]
    with open(os.path.join(log, "StandinParams.json"), "w") as f:
        json.dump(params, f, indent=1, sort_keys=True)
    with open(os.path.join(log, "MasterLog"), "w") as f:
        f.write(f"condor_master stand-in started for {params['GLIDEIN_PILOT_ID']}\n")
    with open(os.path.join(log, "StartLog"), "w") as f:
        f.write(f"startd stand-in: START = {params['START']}\n")
        f.write("x" * int(os.environ.get("STANDIN_MASTER_LOG_BYTES", "0")))
    print(f"condor_master stand-in running pilot {params['GLIDEIN_PILOT_ID']}", flush=True)
    print("condor_master stand-in: stderr works too", file=sys.stderr, flush=True)

    deadline = time.time() + float(os.environ.get("STANDIN_MASTER_SLEEP", "0"))
    while time.time() < deadline and not stopped:
        time.sleep(0.05)
    with open(os.path.join(log, "MasterLog"), "a") as f:
        f.write(f"condor_master stand-in exiting ({'on ' + stopped[0] if stopped else 'normally'})\n")
    return int(os.environ.get("STANDIN_MASTER_EXIT", "0"))


if __name__ == "__main__":
    sys.exit(main())
