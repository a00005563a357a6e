"""Grid pilots through HTCondor-G: grid-universe jobs on a schedd (htcondor2).

The entry's ``options.grid_resource`` says where the pilots go, as HTCondor
spells it, and ``options.schedd`` / ``options.collector`` name the schedd
(default: the local one).

- ``condor ce.example.org ce.example.org:9619``, ``arc arc.example.org``,
  ``batch slurm user@login.example.org``: the job runs the package's grid
  pilot (``pilot/glidein-grid-pilot.sh``, or ``options.executable``) on a
  worker node we did not build. Its input files are the wrapper, its library
  and signature checker, the factory's public key and the envelope; its one
  argument is its id, this schedd's ``$(Cluster).$(Process)`` (the envelope
  names the entry, so the bootstrap service qualifies it).
- ``ec2 https://ec2.us-east-1.amazonaws.com``: HTCondor's EC2 GAHP starts a VM
  from ``image``/``flavor``; the envelope is its user data, from a file
  (``ec2_user_data_file``). The VM runs the image's wrapper, as an ``ec2``
  entry's VM does, and claims its own instance id: the pilot stays (entry,
  cluster.proc), the instance id from the job's GridJobId
  (``ec2 URL client-token i-...``) is its alias.

The envelope, which holds the launch's bootstrap token, travels only as the
contents of a file: never as an argument, in the job's environment or in
another job attribute (``ec2_user_data`` is one), all of which show in job
ads. Every submit spools (``Schedd.submit(spool=True)``, then
``Schedd.spool``): the schedd keeps the files, so a remote schedd never reads
the Airflow worker's disk and a job queued for hours depends on nothing
there; the worker's copies are removed at once.

Credentials never go in a submit description either: the provisioning
connection's secret is written to a file readable by its owner only and the
description names the file (``ec2_access_key_id``/``ec2_secret_access_key``
from an ``aws`` connection; ``x509userproxy`` from a ``glidein_x509`` proxy;
``scitokens_file`` from a ``glidein_token``; or extra ``x509_proxy_file`` /
``token_file`` naming files already on the schedd host).

Our ids are job attributes (GlideinFactory, GlideinEntry, GlideinFrontend,
GlideinLaunch, GlideinRequest); listing ours is one schedd query by them, and
never acts on a job. A batch is one cluster (``count`` procs), one call. A
grid job may wait queued for hours: it is listed with the time the site
started it (JobCurrentStartDate, else when GridJobStatus turned running),
from which its boot timeout and lifetime run. The factory's inventory alone
tends held pilots (``sanitize``): released up to ``options.max_releases``
times (default 3), then removed, with the hold reason in the log and the
pilot's detail. Terminate is ``condor_rm``. Its forced variant,
``condor_rm -forcex``, drops a job from the queue whatever the remote side
says, so it is used only where nothing can still exist behind the job: it
never reached the remote side, the remote side reports it gone, or its pilot
is past the end of its life (its token expired before it started, or its
lifetime is over); an EC2 job's instance is first terminated through the EC2
API with the entry's connection, and the job is forced only once EC2 says the
instance is terminated. What cannot be forced yet stays, reported stuck.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

import classad2
import htcondor2

from airflow_glidein import pilots as P
from airflow_glidein import userdata
from airflow_glidein.hooks.base import LaunchSpec, PilotHook, Refusals
from airflow_glidein.hooks.htcondor import HTCondorHook

log = logging.getLogger(__name__)

PILOT_DIR = Path(__file__).resolve().parent.parent / "pilot"
GRID_PILOT = PILOT_DIR / "glidein-grid-pilot.sh"
PILOT_FILES = ("glidein-wrapper.sh", "glidein-lib.sh", "ed25519_verify.py")  # what the grid pilot runs
ENVELOPE, PUBKEY = "glidein.envelope", "factory.pub"
ATTR = {P.TAG_FACTORY: "GlideinFactory", P.TAG_FRONTEND: "GlideinFrontend", P.TAG_ENTRY: "GlideinEntry",
        P.TAG_LAUNCH: "GlideinLaunch", P.TAG_REQUEST: "GlideinRequest"}
RELEASES = "GlideinReleases"  # how many times we released this pilot from hold
# when nothing of the pilot can run any more: its token's expiry (not started by then, it cannot join), and
# the seconds after its start by which it has ended (boot timeout + lifetime + retire window + END_MARGIN)
TOKEN_EXPIRES, END_OF_LIFE = "GlideinTokenExpires", "GlideinEndOfLife"
END_MARGIN = 900  # s: the startup script's hard stop comes 600 s after the pilot's end of life, then its logs
PROJECTION = ["ClusterId", "ProcId", "JobStatus", "QDate", "EnteredCurrentStatus", "JobCurrentStartDate",
              "HoldReason", "HoldReasonCode", "GridJobId", "GridJobStatus", RELEASES, TOKEN_EXPIRES, END_OF_LIFE,
              *ATTR.values()]
IDLE, RUNNING, REMOVED, COMPLETED, HELD, TRANSFERRING, SUSPENDED = 1, 2, 3, 4, 5, 6, 7
SPOOLING = 16  # HoldReasonCode of a job submitted with spool=True until its input files are spooled
STATE = {IDLE: P.P_PENDING, RUNNING: P.P_RUNNING, REMOVED: P.P_TERMINATING, COMPLETED: P.P_TERMINATED,
         HELD: P.P_ERROR, TRANSFERRING: P.P_RUNNING, SUSPENDED: P.P_STOPPED}
REMOTE_RUNNING = {"RUNNING", "R", "INLRMS:R", "EXECUTING"}  # GridJobStatus of a started job (condor, ec2, arc)
REMOTE_GONE = {"COMPLETED", "REMOVED", "TERMINATED", "FINISHED", "DELETED"}  # ... of one the remote side ended
EC2_INSTANCE = re.compile(r"^i-[0-9a-f]+$")


def job_id(ad: Any) -> str:
    return f"{ad['ClusterId']}.{ad['ProcId']}"


def ec2_ids(grid_job_id: str) -> tuple[str | None, str | None]:
    """(client token, instance id) of an EC2 GAHP job's GridJobId, "ec2 URL TOKEN [i-...]"."""
    parts = grid_job_id.split()
    if len(parts) < 3 or parts[0].lower() != "ec2":
        return None, None
    iid = parts[3] if len(parts) > 3 and EC2_INSTANCE.match(parts[3]) else None
    return parts[2], iid


def started_at(ad: Any) -> float | None:
    """When the site started the job: JobCurrentStartDate, else, while it runs, when it began to run."""
    start = ad.get("JobCurrentStartDate")
    if isinstance(start, (int, float)) and start > 0:
        return float(start)
    remote = str(ad.get("GridJobStatus", "") or "").upper()
    if int(ad.get("JobStatus", 0) or 0) in (RUNNING, TRANSFERRING) or remote in REMOTE_RUNNING:
        return float(ad.get("EnteredCurrentStatus") or ad.get("QDate") or 0) or None
    return None


class HTCondorGPilotHook(PilotHook):
    middleware = "htcondor_g"
    conn_name_attr = "htcondor_g_conn_id"
    default_conn_name = "htcondor_g_default"
    conn_type = "generic"  # the grid credential (proxy, token) or, for ec2, an aws-style key pair
    hook_name = "Glidein pilots through HTCondor-G"

    @cached_property
    def schedd(self) -> Any:
        opts = self.entry.options
        return HTCondorHook(collector=opts.get("collector")).schedd(opts.get("schedd"))

    @property
    def grid_resource(self) -> str:
        return self.entry.options["grid_resource"]  # required and checked by the entry's options schema

    @property
    def ec2(self) -> bool:
        return self.grid_resource.startswith("ec2 ")

    # -- credentials as files ------------------------------------------------
    def _secret_file(self, name: str, content: str) -> str:
        home = os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow")
        folder = os.path.join(self.entry.options.get("credential_dir") or os.path.join(home, "glidein", "credentials"),
                              self.conn_id)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        path = os.path.join(folder, name)
        fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(content)
        os.replace(path + ".tmp", path)
        return path

    def credential_commands(self) -> dict[str, str]:
        """Submit commands naming credential files (written here from the connection, mode 0600)."""
        from airflow_glidein.secrets import read_conn

        c = read_conn(self.conn_id)  # secrets masked as they are read
        if self.ec2:
            key_id, secret = c.login or c.get("aws_access_key_id"), c.password or c.get("aws_secret_access_key")
            if not (key_id and secret):
                raise ValueError(f"Connection {self.conn_id}: an ec2 grid entry needs an access key id and "
                                 "secret (login and password)")
            return {"ec2_access_key_id": self._secret_file("ec2_access_key_id", key_id),
                    "ec2_secret_access_key": self._secret_file("ec2_secret_access_key", secret)}
        if c.get("x509_proxy_file"):
            return {"x509userproxy": c.get("x509_proxy_file")}
        if c.get("token_file"):
            return {"scitokens_file": c.get("token_file")}
        secret = c.get("proxy") or c.get("token") or (c.password or "").strip()
        if secret.startswith("-----BEGIN"):
            return {"x509userproxy": self._secret_file("x509_proxy", secret + "\n")}
        if secret:
            return {"scitokens_file": self._secret_file("token", secret)}
        raise ValueError(f"Connection {self.conn_id}: no grid credential (a glidein_x509 proxy, a glidein_token "
                         "token, or extra x509_proxy_file / token_file)")

    # -- the job ---------------------------------------------------------------
    @contextmanager
    def staged(self, spec: LaunchSpec) -> Iterator[Path]:
        """A private folder on this worker holding the job's input files until they are spooled (then gone):
        the envelope and, for the grid pilot, the factory's public key it checks the envelope with."""
        folder = Path(tempfile.mkdtemp(prefix="glidein-grid-"))  # mode 0700
        try:
            fd = os.open(folder / ENVELOPE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(spec.userdata)
            if not self.ec2:
                (folder / PUBKEY).write_text(self._signer_pem(spec.userdata))
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    @staticmethod
    def _signer_pem(envelope: str) -> str:
        """The public half of the factory key that signed ``envelope`` (the current or the previous one)."""
        from airflow_glidein.bootstrap import keys
        from airflow_glidein.state import store

        kid = userdata.signer_id(userdata.split(envelope)[0])
        key = keys.key_ring(store()).accepted().get(kid or "")
        if key is None:
            raise userdata.EnvelopeError(f"the envelope is signed with key id {kid}, which is not this factory's "
                                         "current or previous signing key")
        return userdata.public_pem(key)

    def description(self, spec: LaunchSpec, tags: dict[str, str], folder: Path) -> htcondor2.Submit:
        opts = self.entry.options
        env = userdata.decode_body(userdata.split(spec.userdata)[0])  # our own envelope, for its deadlines
        end_of_life = sum(int(env.get(k, 0)) for k in ("boot_timeout", "max_lifetime", "retire_window")) + END_MARGIN
        sub: dict[str, str] = {
            "universe": "grid",
            "grid_resource": self.grid_resource,
            "notification": "never",
            **{f"MY.{ATTR[k]}": classad2.quote(str(v)) for k, v in tags.items() if k in ATTR},
            f"MY.{TOKEN_EXPIRES}": str(int(env.get("token_expires", 0))),
            f"MY.{END_OF_LIFE}": str(end_of_life),
            **self.credential_commands(),
        }
        if self.ec2:
            # The GAHP reads the user data from the spooled file (the job's spool directory is its working
            # directory): never ec2_user_data, a job attribute anyone who may read the queue sees.
            sub.update(executable="glidein-pilot", ec2_ami_id=spec.image, ec2_instance_type=str(self.entry.flavor),
                       ec2_user_data_file=ENVELOPE, transfer_input_files=str(folder / ENVELOPE),
                       ec2_tag_names="GlideinLaunch", ec2_tag_GlideinLaunch=spec.launch_id)
            for key in ("ec2_keypair", "ec2_security_groups", "ec2_vpc_subnet"):
                if opts.get(key):
                    sub[key] = str(opts[key])
        else:
            files = [str(PILOT_DIR / f) for f in PILOT_FILES] + [str(folder / ENVELOPE), str(folder / PUBKEY)]
            sub.update(executable=str(opts.get("executable") or GRID_PILOT), transfer_executable="true",
                       arguments="$(Cluster).$(Process)",  # the pilot's id: nothing secret
                       should_transfer_files="YES", when_to_transfer_output="ON_EXIT",
                       transfer_input_files=",".join(files),
                       request_cpus=str(self.entry.cores), request_memory=str(self.entry.memory_mb))
            if self.entry.gpus:
                sub["request_gpus"] = str(self.entry.gpus)
        if opts.get("log_dir"):
            base = os.path.join(opts["log_dir"], "pilot.$(Cluster).$(Process)")
            sub.update(output=base + ".out", error=base + ".err", log=os.path.join(opts["log_dir"], "pilots.log"))
        return htcondor2.Submit(sub)

    # -- the interface ---------------------------------------------------------
    def _constraint(self, launch_id: str | None, extra: str | None = None) -> str:
        parts = [f"{ATTR[P.TAG_FACTORY]} == {classad2.quote(self.factory)}",
                 f"{ATTR[P.TAG_ENTRY]} == {classad2.quote(self.entry.name)}"]
        if launch_id:
            parts.append(f"{ATTR[P.TAG_LAUNCH]} == {classad2.quote(launch_id)}")
        if extra:
            parts.append(extra)
        return " && ".join(parts)

    def _ads(self, launch_id: str | None = None, extra: str | None = None) -> list[classad2.ClassAd]:
        constraint = self._constraint(launch_id, extra)
        return self.api_call(lambda: self.schedd.query(constraint=constraint, projection=PROJECTION), "schedd query")

    def _list(self, launch_id: str | None = None) -> list[P.ProviderInstance]:
        return [_instance(ad) for ad in self._ads(launch_id)]

    def _create(self, spec: LaunchSpec, count: int, tags: dict[str, str]) -> list[P.ProviderInstance]:
        with self.staged(spec) as folder:
            sub = self.description(spec, tags, folder)
            result = self.api_call(lambda: self.schedd.submit(sub, count=count, spool=True), "submit")
            first, cluster = result.first_proc(), result.cluster()
            made = [P.ProviderInstance(id=f"{cluster}.{proc}", state=P.P_PENDING, launched=0.0, tags=dict(tags)) for proc in range(first, first + result.num_procs())]
            self._created(made)  # the jobs exist from here on: recorded before anything else can fail
            try:
                self.api_call(lambda: self.schedd.spool(result), "spool")
            except Exception:
                # held for spooling, they never got their files and nothing runs behind them: remove them
                try:
                    self._act(htcondor2.JobAction.Remove, [i.id for i in made],
                              "glidein factory: the input files could not be spooled")
                except Exception as exc:
                    log.warning("Cluster %s at %s: removing it after a failed spool failed too (%s); the "
                                "inventory removes it later", cluster, self.entry.name, exc)
                raise
        return made

    def _act(self, action: htcondor2.JobAction, ids: list[str], reason: str) -> Refusals:
        ad = self.api_call(lambda: self.schedd.act(action, list(ids), reason=reason), f"{action.name}")
        done = int(ad.get("TotalSuccess", len(ids))) if ad is not None else len(ids)
        if done < len(ids):
            log.info("%s: %d of %d pilots acted on; the listing tells which remain", action.name, done, len(ids))
        return {}

    def _terminate(self, ids: list[str]) -> Refusals:
        return self._act(htcondor2.JobAction.Remove, ids, "glidein factory: terminate")

    def _force_terminate(self, ids: list[str]) -> Refusals:
        """``condor_rm -forcex`` for the jobs nothing can still run behind; the others are refused, with why."""
        wanted = set(ids)
        refused: Refusals = {}
        force = []
        for ad in self._ads():
            jid = job_id(ad)
            if jid in wanted:
                why = self._still_behind(ad)
                if why:
                    refused[jid] = why
                else:
                    force.append(jid)
        if force:
            self._act(htcondor2.JobAction.RemoveX, force, "glidein factory: terminate (forcex)")
        for jid, why in sorted(refused.items()):
            log.warning("Pilot %s at %s is not forced out of the queue: %s", jid, self.entry.name, why)
        return refused

    def _still_behind(self, ad: Any, now: float | None = None) -> str | None:
        """Why something of this job may still run at the remote side (None: nothing can)."""
        now = time.time() if now is None else now
        grid_id = str(ad.get("GridJobId", "") or "")
        if not grid_id:
            return None  # it never reached the remote side
        if self.ec2:
            return self._ec2_gone(*ec2_ids(grid_id))
        if str(ad.get("GridJobStatus", "") or "").upper() in REMOTE_GONE:
            return None
        start = started_at(ad)
        if start is None:
            until = float(ad.get(TOKEN_EXPIRES, 0) or 0)
            what = "its bootstrap token expires (a pilot started later cannot join)"
        else:
            until = start + float(ad.get(END_OF_LIFE, 0) or 0)
            what = "its pilot's lifetime is over"
        if now > until > 0:
            return None
        return (f"it reached the remote side ({grid_id}), which may still run it; not forced before {what}, "
                f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(until)) if until else 'never: no deadline known'}")

    # -- EC2 instances behind EC2 GAHP jobs -------------------------------------
    @cached_property
    def ec2_client(self) -> Any:
        """The EC2 API the GAHP talks to (grid_resource's URL), with the entry's connection."""
        from airflow.providers.amazon.aws.hooks.ec2 import EC2Hook

        url = self.grid_resource.split()[1]
        region = self.entry.region or (re.findall(r"ec2\.([a-z0-9-]+)\.amazonaws\.com", url) or ["us-east-1"])[0]
        hook = EC2Hook(api_type="client_type", aws_conn_id=self.conn_id, region_name=region)
        return hook.get_session(region_name=region).client("ec2", endpoint_url=url)

    def _ec2_gone(self, client_token: str | None, instance: str | None) -> str | None:
        """Terminate an EC2 GAHP job's instance through the EC2 API; None once EC2 says it is terminated."""
        c = self.ec2_client
        if instance:
            params: dict[str, Any] = {"InstanceIds": [instance]}
        elif client_token:
            params = {"Filters": [{"Name": "client-token", "Values": [client_token]}]}
        else:
            return None
        try:
            found = self._ec2_states(params)
        except Exception as exc:
            if "InvalidInstanceID" in str(exc):
                return None  # EC2 never had it, or forgot it
            return f"its EC2 instance cannot be looked up now ({type(exc).__name__}: {str(exc)[:200]})"
        live = [i for i, state in found.items() if state != "terminated"]
        if not live:
            return None
        try:
            self.api_call(lambda: c.terminate_instances(InstanceIds=live), "terminate_instances")
            found = self._ec2_states({"InstanceIds": live})
        except Exception as exc:
            return f"its EC2 instance {', '.join(live)} could not be terminated ({type(exc).__name__}: {str(exc)[:200]})"
        left = {i: s for i, s in found.items() if s != "terminated"}
        if not left:
            log.info("EC2 instances %s behind pilots at %s terminated through the EC2 API", live, self.entry.name)
            return None
        return (f"its EC2 instance is {', '.join(f'{i} {s}' for i, s in left.items())} after a terminate through "
                "the EC2 API; the job is forced once EC2 says it is terminated")

    def _ec2_states(self, params: dict[str, Any]) -> dict[str, str]:
        pages = self.api_call(lambda: list(self.ec2_client.get_paginator("describe_instances").paginate(**params)),
                              "describe_instances")
        return {i["InstanceId"]: i["State"]["Name"] for page in pages for r in page.get("Reservations", [])
                for i in r.get("Instances", [])}

    # -- the inventory's upkeep -------------------------------------------------
    def sanitize(self, instances: list[P.ProviderInstance]) -> list[P.ProviderInstance]:
        """Held pilots are released (up to max_releases) or removed, with the hold reason; a job still held
        for spooling past the listing grace (its submit task died before spooling) is removed."""
        if not any(i.state == P.P_ERROR or i.detail.startswith(SPOOLING_DETAIL) for i in instances):
            return instances
        out = {i.id: i for i in instances}
        limit = int(self.entry.options.get("max_releases", 3))
        now = time.time()
        by_count: dict[int, list[str]] = {}
        remove: dict[str, str] = {}
        for ad in self._ads(extra=f"JobStatus == {HELD}"):
            jid, inst = job_id(ad), out.get(job_id(ad))
            if inst is None:
                continue
            n, why = int(ad.get(RELEASES, 0) or 0), str(ad.get("HoldReason", "no hold reason given"))
            if int(ad.get("HoldReasonCode", 0) or 0) == SPOOLING:
                if now - inst.launched > self.entry.listing_grace:
                    remove[jid] = "its input files were never spooled"
                    inst.state, inst.detail = P.P_TERMINATING, remove[jid]
            elif n < limit:
                by_count.setdefault(n, []).append(jid)
                inst.state, inst.detail = P.P_PENDING, f"released from hold ({n + 1} of {limit}): {why}"
            else:
                remove[jid] = f"held after {limit} releases"
                inst.state, inst.detail = P.P_TERMINATING, f"removed after {n} releases: {why}"
                log.warning("Pilot %s at %s held again after %d releases, removed: %s", jid, self.entry.name, n, why)
        try:
            for n, jids in sorted(by_count.items()):
                self.api_call(lambda jids=jids, n=n: self.schedd.edit(jids, RELEASES, str(n + 1)), "edit")
                self._act(htcondor2.JobAction.Release, jids, "glidein factory: release held pilot")
                log.info("Released %d held pilots at %s (release %d of %d)", len(jids), self.entry.name, n + 1, limit)
            for why in set(remove.values()):
                self._act(htcondor2.JobAction.Remove, [j for j, w in remove.items() if w == why],
                          f"glidein factory: {why}")
        except Exception as exc:  # the listing stands; the next cycle tries again
            log.warning("Tending held pilots at %s failed (%s); tried again next cycle", self.entry.name, exc)
        return list(out.values())

    def test_connection(self) -> tuple[bool, str]:
        try:
            n = len(self.schedd.query(constraint="false", projection=["ClusterId"]))
            return True, f"schedd answered ({n} jobs)"
        except Exception as exc:
            return False, str(exc)


SPOOLING_DETAIL = "waiting for its input files to be spooled"


def _instance(ad: classad2.ClassAd) -> P.ProviderInstance:
    status = int(ad.get("JobStatus", 0))
    grid_id = str(ad.get("GridJobId", "") or "")
    state = STATE.get(status, P.P_ERROR)
    detail = {HELD: f"held: {ad.get('HoldReason', '')}"}.get(status, str(ad.get("GridJobStatus", "")))
    if status == HELD and int(ad.get("HoldReasonCode", 0) or 0) == SPOOLING:
        state, detail = P.P_PENDING, SPOOLING_DETAIL
    instance = ec2_ids(grid_id)[1]
    return P.ProviderInstance(
        id=job_id(ad),
        state=state,
        launched=float(ad.get("QDate", 0) or 0),
        tags={tag: str(ad[attr]) for tag, attr in ATTR.items() if attr in ad},
        detail=detail,
        started=started_at(ad),
        aliases=(instance,) if instance else (),
    )
