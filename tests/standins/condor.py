"""A stand-in for an HTCondor pool (collector + schedds), for tests only.

No HTCondor daemon can run on the CI machines, so tests replace the two
classes of the real ``htcondor2`` module that reach daemons,
``htcondor2.Collector`` and ``htcondor2.Schedd``, with these (``install``
monkeypatches the module; the product never knows). Everything else is
real: ads are real classad2 ClassAds, constraints and projections are
evaluated with classad2, submits take real ``htcondor2.Submit`` objects and
return real ``htcondor2.SubmitResult`` objects, the enums are htcondor2's.

What it covers:
- Collector: ``query`` (schedd, startd and any ads, constraint, projection),
  ``locate`` (schedds, and startds by Name), ``locateAll``; startd ads added
  with ``Pool.add_startd`` and taken away with ``Pool.remove_startds`` (the
  factory's inventory reads GLIDEIN_PILOT_ID, GLIDEIN_Factory, State, ...).
- ``htcondor2.send_command``: commands sent to a located startd are recorded
  in ``Pool.commands`` as (command name, startd Name); the startd's ads stay
  (a peaceful shutdown lets running jobs finish; tests decide when it goes).
- Schedd: ``query`` with ``QueryOpt.Default`` (job ads), ``GroupBy`` (one ad
  per distinct value of the projection, with JobCount) and ``AutoCluster``
  (one ad per distinct value of the schedd's significant attributes, with
  JobCount, AutoClusterId, AutoClusterAttrs); ``submit`` (records the real
  Submit object, queues idle jobs; ``$(Cluster)`` and ``$(Process)`` are
  expanded per job, as condor_submit does; with ``spool=True`` the jobs are
  held, HoldReasonCode 16, until ``spool``), ``spool`` (copies the
  executable and input files from the submitter's disk into the job's spool
  directory, its Iwd from then on, and releases the jobs), ``act`` (hold,
  release, remove, remove-x; each recorded in ``actions``), ``edit``, and
  ``set_status`` for tests to move jobs along.
- The remote side of grid jobs, played by tests: ``start`` (the site starts a
  job: JobStatus running, JobCurrentStartDate, GridJobId, GridJobStatus),
  ``ec2_gahp`` (what the gridmanager's EC2 GAHP does: RunInstances with the
  job's AMI, instance type and the user data file from its spool directory,
  then GridJobId ``ec2 URL client-token i-...``) and ``sandbox`` (a job's
  transferred files in a scratch directory, with its arguments and
  environment, as a worker node gets them).
- Faults: a schedd (or the collector) can ``fail`` (raises
  HTCondorException, as the bindings do) or ``hang`` (blocks until the pool
  is closed, as an unresponsive daemon does), or refuse GroupBy queries (an
  old schedd).

Job ids are per schedd, as in HTCondor: every schedd numbers its clusters from
1, so two schedds (in one pool or in two) hand out the same ``cluster.proc``
ids; each is reached at an address of its own, whatever its name.

The frontend queries schedds from forked children (see demand.collect): a
child sees the pool as it was at the fork, and its queries are recorded in a
file (``ScheddState.queries``) so that tests can read what was asked.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import shlex
import tempfile
import threading
import time
from pathlib import Path
from collections.abc import Iterable, Mapping
from typing import Any

import classad2
import htcondor2
from htcondor2._submit_result import _SpooledProcAdList

IDLE, RUNNING, REMOVED, COMPLETED, HELD = 1, 2, 3, 4, 5
SPOOLING = 16  # HoldReasonCode of a job waiting for its input files to be spooled
DEFAULT_SIGNIFICANT = ["RequestCpus", "RequestMemory", "RequestDisk", "RequestGPUs", "Requirements", "JobUniverse"]
_POOLS: dict[str, Pool] = {}  # collector address -> pool, so Collector("host:port") finds its pool
_PORTS = itertools.count(9619)  # each schedd its own address, across pools: Schedd(location) finds that one


def _true(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return isinstance(value, (int, float)) and not isinstance(value, classad2.Value) and value != 0


def _constraint(constraint: Any) -> classad2.ExprTree:
    if constraint is None or constraint == "":
        return classad2.ExprTree("true")
    return constraint if isinstance(constraint, classad2.ExprTree) else classad2.ExprTree(str(constraint))


def _select(ads: Iterable[classad2.ClassAd], constraint: Any) -> list[classad2.ClassAd]:
    expr = _constraint(constraint)
    return [ad for ad in ads if _true(expr.eval(ad))]


def _project(ad: classad2.ClassAd, projection: list[str] | None) -> classad2.ClassAd:
    if not projection:
        return classad2.ClassAd(dict(ad.items()))
    out = classad2.ClassAd()
    for attr in projection:
        if attr in ad:
            out[attr] = ad[attr]  # expressions stay unevaluated, as the schedd sends them
    return out


class _Faulty:
    """fail / hang behaviour shared by the daemons."""

    def __init__(self, pool: Pool):
        self.pool = pool
        self.mode = "ok"
        self.calls = 0

    def fail(self, message: str = "Failed to connect") -> None:
        self.mode, self.message = "fail", message

    def hang(self) -> None:
        self.mode = "hang"

    def heal(self) -> None:
        self.mode = "ok"

    def _enter(self, what: str) -> None:
        self.calls += 1
        if self.mode == "fail":
            raise htcondor2.HTCondorException(f"{what}: {self.message}")
        if self.mode == "hang":
            self.pool.closed.wait(600)
            raise htcondor2.HTCondorException(f"{what}: connection timed out")


class ScheddState(_Faulty):
    """One schedd's queue: job ads by (cluster, proc), and what was submitted."""

    def __init__(self, pool: Pool, name: str, significant: list[str] | None = None):
        super().__init__(pool)
        self.name = name
        self.address = f"<127.0.0.1:{next(_PORTS)}?sock=schedd_{name}>"
        self.significant = list(significant or DEFAULT_SIGNIFICANT)
        self.jobs: dict[tuple[int, int], classad2.ClassAd] = {}
        self.submits: list[dict[str, Any]] = []  # {"cluster", "count", "description": htcondor2.Submit}
        # What was asked, one JSON line per query, in a file: the frontend queries from forked children.
        self._query_log = Path(pool.dir) / f"{name}.queries.jsonl"
        self.groupby = True  # False: an old schedd that refuses GroupBy / AutoCluster queries
        self.keep_removed = False  # True: removed jobs stay in the queue (status 3) until released by a test
        self.actions: list[tuple[str, list[str]]] = []  # (JobAction name or "edit", job ids) in order
        self.clock = time.time  # QDate, EnteredCurrentStatus, JobCurrentStartDate (a test may move it)
        self.gahp: Any = None  # the EC2 client ec2_gahp started instances with (condor_rm terminates them)
        self._clusters = itertools.count(1)
        self._lock = threading.Lock()

    @property
    def queries(self) -> list[dict[str, Any]]:
        """The queries this schedd answered: {"constraint", "projection", "opts"}, oldest first."""
        if not self._query_log.exists():
            return []
        return [json.loads(line) for line in self._query_log.read_text().splitlines()]

    # -- filling the queue from tests
    def add_jobs(self, attrs: Mapping[str, Any], count: int = 1, status: int = IDLE, qdate: float | None = None) -> int:
        """``count`` jobs of one shape in a new cluster; returns the cluster id."""
        cluster = next(self._clusters)
        for proc in range(count):
            ad = classad2.ClassAd()
            ad["ClusterId"], ad["ProcId"] = cluster, proc
            ad["JobStatus"] = status
            ad["QDate"] = int(self.clock() if qdate is None else qdate)
            for key, value in attrs.items():
                ad[key] = classad2.ExprTree(value[1:]) if isinstance(value, str) and value.startswith("=") else value
            self.jobs[(cluster, proc)] = ad
        return cluster

    def set_status(self, job_spec: Any, status: int, reason: str | None = None) -> int:
        n = 0
        for ad in self._match(job_spec):
            ad["JobStatus"] = status
            ad["EnteredCurrentStatus"] = int(self.clock())
            if status == HELD:
                ad["HoldReason"] = reason or "held by the test"
            n += 1
        return n

    # -- the htcondor2.Schedd interface
    def query(self, constraint: Any = "True", projection: list[str] = [], callback: Any = None, limit: int = -1,
              opts: htcondor2.QueryOpt = htcondor2.QueryOpt.Default) -> list:
        self._enter(f"Failed to query schedd {self.name}")
        with open(self._query_log, "a") as fh:
            fh.write(json.dumps({"constraint": str(constraint), "projection": list(projection), "opts": int(opts)}) + "\n")
        selected = _select(list(self.jobs.values()), constraint)
        if opts & (htcondor2.QueryOpt.GroupBy | htcondor2.QueryOpt.AutoCluster):
            if not self.groupby:
                raise htcondor2.HTCondorException(f"schedd {self.name} does not support aggregate queries")
            if opts & htcondor2.QueryOpt.GroupBy:
                ads = self._aggregate(selected, list(projection), projection)
            else:
                ads = self._aggregate(selected, self.significant, projection, autocluster=True)
        else:
            ads = [_project(ad, projection) for ad in selected]
        if limit >= 0:
            ads = ads[:limit]
        return [callback(ad) for ad in ads] if callback else ads

    def _aggregate(self, ads: list[classad2.ClassAd], by: list[str], projection: list[str], autocluster: bool = False):
        groups: dict[tuple, list[classad2.ClassAd]] = {}
        for ad in ads:
            key = tuple(str(ad.lookup(a)) if a in ad else None for a in by)
            groups.setdefault(key, []).append(ad)
        out = []
        for n, members in enumerate(groups.values(), start=1):
            agg = _project(members[0], by)
            agg["JobCount"] = len(members)
            agg["JobIds"] = " ".join(f"{a['ClusterId']}.{a['ProcId']}" for a in members[:2])
            if autocluster:
                agg["AutoClusterId"] = n
                agg["AutoClusterAttrs"] = ",".join(by)
                if projection:
                    agg = _project(agg, list(projection) + ["JobCount", "JobIds", "AutoClusterId", "AutoClusterAttrs"])
            out.append(agg)
        return out

    def submit(self, description: htcondor2.Submit, count: int = 0, spool: bool = False, itemdata: Any = None,
               queue: str | None = None) -> htcondor2.SubmitResult:
        self._enter(f"Failed to submit to schedd {self.name}")
        if not isinstance(description, htcondor2.Submit):
            raise TypeError("description must be an htcondor2.Submit")
        count = count or 1
        with self._lock:
            cluster = next(self._clusters)
            for proc in range(count):
                ad = classad2.ClassAd()
                for key, value in _submit_attrs(description, cluster, proc).items():
                    ad[key] = value
                ad["ClusterId"], ad["ProcId"] = cluster, proc
                ad["JobStatus"] = IDLE
                ad["QDate"] = ad["EnteredCurrentStatus"] = int(self.clock())
                if spool:  # as the schedd does: held until the input files are spooled
                    ad["JobStatus"], ad["HoldReasonCode"] = HELD, SPOOLING
                    ad["HoldReason"] = "Spooling input data files"
                self.jobs[(cluster, proc)] = ad
            self.submits.append({"cluster": cluster, "count": count, "description": description, "spool": spool})
        base = _submit_attrs(description, cluster, 0)
        cluster_ad = classad2.ClassAd({k: v for k, v in base.items()})
        cluster_ad["ClusterId"] = cluster
        return htcondor2.SubmitResult(cluster, 0, count, cluster_ad, _SpooledProcAdList() if spool else None)

    def spool(self, result: htcondor2.SubmitResult) -> None:
        """Upload a spooled submit's files: the executable (if transferred) and input files, into each job's
        spool directory, which becomes its Iwd (relative names resolve there); then the jobs are released."""
        if result._spooledProcAds is None:
            raise ValueError("result must have come from submit() with spool set")
        self._enter(f"Failed to spool to schedd {self.name}")
        for ad in self._match(result.cluster()):
            folder = Path(self.pool.dir) / "spool" / f"{ad['ClusterId']}.{ad['ProcId']}"
            folder.mkdir(parents=True, exist_ok=True)
            files = [f.strip() for f in str(ad.get("TransferInput", "")).split(",") if f.strip()]
            if str(ad.get("TransferExecutable", "")).lower() == "true":
                files.append(str(ad["Cmd"]))
            for f in files:
                if not os.path.isfile(f):
                    raise htcondor2.HTCondorException(f"Failed to spool {f}: no such file")
                shutil.copy2(f, folder / os.path.basename(f))
            ad["Iwd"] = str(folder)
            if ad.get("HoldReasonCode") == SPOOLING:
                ad["JobStatus"], ad["EnteredCurrentStatus"] = IDLE, int(self.clock())
                del ad["HoldReasonCode"]
                del ad["HoldReason"]

    # -- the remote side of grid jobs, played by tests
    def start(self, job_spec: Any) -> list[str]:
        """The site starts these grid jobs (as the gridmanager then records it); returns their ids. A CE numbers
        its jobs its own way: the remote id in GridJobId is not ours."""
        out = []
        for ad in self._match(job_spec):
            now = int(self.clock())
            ad["JobStatus"], ad["EnteredCurrentStatus"], ad["JobCurrentStartDate"] = RUNNING, now, now
            ad["GridJobStatus"] = "RUNNING"
            if "GridJobId" not in ad:
                ad["GridJobId"] = f"{ad['GridResource']} {ad['ClusterId'] + 7000}.{ad['ProcId']}"
            out.append(f"{ad['ClusterId']}.{ad['ProcId']}")
        return out

    def ec2_gahp(self, job_spec: Any, client: Any) -> dict[str, str]:
        """What HTCondor's EC2 GAHP does for these jobs: one RunInstances each (AMI, instance type, the user data
        file from the job's spool directory, a client token), then GridJobId "ec2 URL TOKEN i-..." and running.
        Returns {job id: instance id}."""
        out = {}
        for ad in self._match(job_spec):
            jid = f"{ad['ClusterId']}.{ad['ProcId']}"
            token = f"glidein-standin-{self.name}-{jid}"
            url = str(ad["GridResource"]).split()[1]
            ad["GridJobId"] = f"ec2 {url} {token}"  # saved before the call, as the gridmanager does
            userdata = Path(str(ad["Iwd"]), str(ad["EC2UserDataFile"])).read_text()
            made = client.run_instances(ImageId=str(ad["EC2AmiID"]), InstanceType=str(ad["EC2InstanceType"]),
                                        MinCount=1, MaxCount=1, UserData=userdata, ClientToken=token)
            iid = made["Instances"][0]["InstanceId"]
            self.gahp = client
            ad["GridJobId"] = f"ec2 {url} {token} {iid}"
            ad["EC2InstanceName"] = iid
            self.start(jid)
            ad["GridJobStatus"] = "running"
            out[jid] = iid
        return out

    def _cancel_remote(self, ad: classad2.ClassAd) -> bool:
        """condor_rm of a grid job: the gridmanager ends it at the remote side first (an EC2 GAHP job's instance
        is terminated); True once nothing runs there. A remote side that cannot be reached keeps the job in X."""
        instance = str(ad.get("EC2InstanceName", "") or "")
        if not instance or self.gahp is None:
            return True
        try:
            self.gahp.terminate_instances(InstanceIds=[instance])
        except Exception:
            return False
        return True

    def sandbox(self, job_id: str, dest: Path) -> tuple[list[str], dict[str, str]]:
        """A job's transferred files in ``dest`` as a worker node gets them (the executable as condor_exec.exe),
        and the job's command line and environment."""
        (ad,) = self._match(job_id)
        dest.mkdir(parents=True, exist_ok=True)
        spooled = Path(str(ad["Iwd"]))
        cmd = os.path.basename(str(ad["Cmd"]))
        for f in spooled.iterdir():
            target = dest / ("condor_exec.exe" if f.name == cmd else f.name)
            shutil.copy2(f, target)
        (dest / "condor_exec.exe").chmod(0o755)
        env = dict(item.split("=", 1) for item in shlex.split(str(ad.get("Environment", ""))) if "=" in item)
        return [str(dest / "condor_exec.exe"), *shlex.split(str(ad.get("Args", "")))], env

    def act(self, action: htcondor2.JobAction, job_spec: Any, reason: str | None = None) -> classad2.ClassAd:
        self._enter(f"Failed to act on schedd {self.name}")
        self.actions.append((action.name, [f"{a['ClusterId']}.{a['ProcId']}" for a in self._match(job_spec)]))
        done = 0
        for ad in self._match(job_spec):
            key = (ad["ClusterId"], ad["ProcId"])
            if action == htcondor2.JobAction.Hold:
                ad["JobStatus"], ad["HoldReason"] = HELD, reason or "via condor_hold"
            elif action == htcondor2.JobAction.Release:
                if ad["JobStatus"] != HELD:
                    continue
                ad["JobStatus"] = IDLE
            elif action in (htcondor2.JobAction.Remove, htcondor2.JobAction.RemoveX):
                ad["JobStatus"] = REMOVED
                if action == htcondor2.JobAction.RemoveX:
                    del self.jobs[key]  # -forcex: gone from the queue, whatever runs behind it
                elif not self.keep_removed and self._cancel_remote(ad):
                    del self.jobs[key]
            else:
                continue
            done += 1
        return classad2.ClassAd({"TotalSuccess": done, "TotalJobAds": done})

    def edit(self, job_spec: Any, attr: str, value: Any, flags: Any = None) -> int:
        self._enter(f"Failed to edit on schedd {self.name}")
        self.actions.append(("edit", [f"{a['ClusterId']}.{a['ProcId']}" for a in self._match(job_spec)]))
        n = 0
        for ad in self._match(job_spec):
            ad[attr] = classad2.ExprTree(value) if isinstance(value, str) else value
            n += 1
        return n

    def _match(self, job_spec: Any) -> list[classad2.ClassAd]:
        """Jobs named by "c.p", "c", an int cluster, a list of those, or a constraint."""
        if isinstance(job_spec, int):
            return [ad for (c, _), ad in list(self.jobs.items()) if c == job_spec]
        if isinstance(job_spec, (list, tuple)):
            return [ad for spec in job_spec for ad in self._match(str(spec))]
        text = str(job_spec)
        parts = text.split(".")
        if all(p.isdigit() for p in parts) and len(parts) in (1, 2):
            c = int(parts[0])
            return [ad for (cc, pp), ad in list(self.jobs.items()) if cc == c and (len(parts) == 1 or pp == int(parts[1]))]
        return _select(list(self.jobs.values()), job_spec)


COMMANDS = {"executable": "Cmd", "arguments": "Args", "grid_resource": "GridResource", "request_cpus": "RequestCpus",
            "request_memory": "RequestMemory", "request_gpus": "RequestGPUs", "transfer_executable": "TransferExecutable",
            "transfer_input_files": "TransferInput", "should_transfer_files": "ShouldTransferFiles",
            "environment": "Environment", "x509userproxy": "x509userproxy", "scitokens_file": "ScitokensFile",
            "ec2_user_data": "EC2UserData", "ec2_user_data_file": "EC2UserDataFile", "ec2_ami_id": "EC2AmiID",
            "ec2_instance_type": "EC2InstanceType", "ec2_access_key_id": "EC2AccessKeyId",
            "ec2_secret_access_key": "EC2SecretAccessKey", "ec2_keypair": "EC2KeyPair", "ec2_tag_names": "EC2TagNames"}
_MACROS = re.compile(r"\$\((cluster|clusterid|process|procid)\)", re.IGNORECASE)


def _submit_attrs(description: htcondor2.Submit, cluster: int = 1, proc: int = 0) -> dict[str, Any]:
    """The job ad attributes a submit description sets (the usual commands, and every +Attr / MY.Attr), with
    $(Cluster) and $(Process) expanded for this job as condor_submit does."""
    universes = {"vanilla": 5, "grid": 9, "scheduler": 7, "local": 12}
    out: dict[str, Any] = {"JobUniverse": universes.get(str(description.get("universe", "vanilla")).lower(), 5)}
    for key, value in description.items():
        text = _MACROS.sub(lambda m: str(cluster if m.group(1).lower().startswith("cluster") else proc), str(value))
        if key.startswith(("MY.", "+")):
            name = key.split(".", 1)[1] if key.startswith("MY.") else key[1:]
            out[name] = classad2.ExprTree(text)
        elif key.lower() in COMMANDS:
            out[COMMANDS[key.lower()]] = int(text) if text.isdigit() else text
    return out


class CollectorState(_Faulty):
    pass


class Pool:
    """One pool: a collector, its schedds, its startd ads. ``install`` makes htcondor2 reach it."""

    def __init__(self, address: str = "standin-collector.test:9618"):
        self.address = address
        self.schedds: dict[str, ScheddState] = {}
        self.startds: list[classad2.ClassAd] = []
        self.commands: list[tuple[str, str]] = []  # (DaemonCommand name, startd Name) sent by send_command
        self.collector = CollectorState(self)
        self.closed = threading.Event()
        self.dir = tempfile.mkdtemp(prefix="condor-standin-")

    def add_schedd(self, name: str, significant: list[str] | None = None, address: str | None = None) -> ScheddState:
        """A schedd; ``address`` points its location ad elsewhere (e.g. at a socket the real bindings reach)."""
        self.schedds[name] = ScheddState(self, name, significant)
        if address:
            self.schedds[name].address = address
        return self.schedds[name]

    def add_startd(self, attrs: Mapping[str, Any]) -> classad2.ClassAd:
        ad = classad2.ClassAd()
        for key, value in attrs.items():
            ad[key] = value
        ad.setdefault("MyType", "Machine")
        ad.setdefault("MyAddress", f"<127.0.0.1:9618?sock=startd_{attrs.get('Name', len(self.startds))}>")
        self.startds.append(ad)
        return ad

    def remove_startds(self, pilot_ids: Iterable[str]) -> int:
        """Take away every startd ad of these pilots (GLIDEIN_PILOT_ID), as when a pilot exits."""
        gone = set(pilot_ids)
        before = len(self.startds)
        self.startds = [ad for ad in self.startds if ad.get("GLIDEIN_PILOT_ID") not in gone]
        return before - len(self.startds)

    def install(self, monkeypatch: Any) -> Pool:
        _POOLS[self.address] = self
        monkeypatch.setattr(htcondor2, "Collector", Collector)
        monkeypatch.setattr(htcondor2, "Schedd", Schedd)
        monkeypatch.setattr(htcondor2, "send_command", send_command)
        return self

    def close(self) -> None:
        """Release every hung call and forget the pool."""
        self.closed.set()
        _POOLS.pop(self.address, None)
        shutil.rmtree(self.dir, ignore_errors=True)

    def location(self, sd: ScheddState) -> classad2.ClassAd:
        return classad2.ClassAd({"MyType": "Scheduler", "Name": sd.name, "MyAddress": sd.address,
                                 "CondorVersion": "$CondorVersion: 25.0.0 Jan 01 2025 $",
                                 "CondorPlatform": "$CondorPlatform: X86_64-Ubuntu_22.04 $", "CollectorHost": self.address})


def _pool(address: Any) -> Pool:
    if address is None and len(_POOLS) == 1:
        return next(iter(_POOLS.values()))
    pool = _POOLS.get(str(address))
    if pool is None:
        raise htcondor2.HTCondorException(f"Failed to contact collector {address}")
    return pool


class Collector:
    """htcondor2.Collector over a Pool."""

    def __init__(self, pool: Any = None, security: Any = None):
        self._address = pool

    def query(self, ad_type: htcondor2.AdType = htcondor2.AdType.Any, constraint: str | None = None,
              projection: list[str] | None = None, statistics: str | None = None) -> list[classad2.ClassAd]:
        pool = _pool(self._address)
        pool.collector._enter(f"Failed to query collector {pool.address}")
        if ad_type in (htcondor2.AdType.Startd, htcondor2.AdType.Slot):
            ads = pool.startds
        elif ad_type == htcondor2.AdType.Schedd:
            ads = [pool.location(sd) for sd in pool.schedds.values()]
        elif ad_type == htcondor2.AdType.Collector:
            ads = [classad2.ClassAd({"MyType": "Collector", "Name": pool.address})]
        else:
            ads = pool.startds + [pool.location(sd) for sd in pool.schedds.values()]
        return [_project(ad, projection) for ad in _select(ads, constraint)]

    def locate(self, daemon_type: htcondor2.DaemonType, name: str | None = None) -> classad2.ClassAd:
        pool = _pool(self._address)
        pool.collector._enter(f"Failed to locate {name}")
        if daemon_type == htcondor2.DaemonType.Startd:
            ad = next((a for a in pool.startds if name is not None and a.get("Name") == name), None)
            if ad is None:
                raise htcondor2.HTCondorException(f"Unable to locate daemon {name}")
            return classad2.ClassAd({"MyType": "Machine", "Name": name, "MyAddress": ad["MyAddress"]})
        if daemon_type != htcondor2.DaemonType.Schedd:
            raise htcondor2.HTCondorException(f"stand-in locates schedds and startds only, not {daemon_type}")
        sd = pool.schedds.get(name) if name else next(iter(pool.schedds.values()), None)
        if sd is None:
            raise htcondor2.HTCondorException(f"Unable to locate daemon {name}")
        return pool.location(sd)

    def locateAll(self, daemon_type: htcondor2.DaemonType) -> list[classad2.ClassAd]:
        pool = _pool(self._address)
        pool.collector._enter("Failed to locate daemons")
        if daemon_type != htcondor2.DaemonType.Schedd:
            return []
        return [pool.location(sd) for sd in pool.schedds.values()]


def send_command(ad: classad2.ClassAd, dc: htcondor2.DaemonCommand, target: str | None = None) -> None:
    """htcondor2.send_command to a startd located through the stand-in collector: recorded."""
    if not isinstance(dc, htcondor2.DaemonCommand):
        raise TypeError("dc must be an htcondor2.DaemonCommand")
    for pool in _POOLS.values():
        if any(a.get("MyAddress") == ad.get("MyAddress") for a in pool.startds):
            pool.collector._enter(f"Failed to send {dc.name} to {ad.get('Name')}")
            pool.commands.append((dc.name, str(ad["Name"])))
            return
    raise htcondor2.HTCondorException(f"Failed to send {dc.name} to {ad.get('Name')}: no daemon at {ad.get('MyAddress')}")


class Schedd:
    """htcondor2.Schedd, built from a location ad as the real one is."""

    def __init__(self, location: classad2.ClassAd | None = None):
        if location is None:
            raise htcondor2.HTCondorException("the stand-in needs a location ad (Collector.locate)")
        self._address = location["MyAddress"]

    def _state(self) -> ScheddState:
        for pool in _POOLS.values():
            for sd in pool.schedds.values():
                if sd.address == self._address:
                    return sd
        raise htcondor2.HTCondorException(f"Failed to connect to schedd at {self._address}")

    def __getattr__(self, name: str) -> Any:
        if name in ("query", "submit", "spool", "act", "edit"):
            return getattr(self._state(), name)
        raise AttributeError(name)
