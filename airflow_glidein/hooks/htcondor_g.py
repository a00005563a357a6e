"""Grid pilots through HTCondor-G: grid-universe jobs on a schedd (htcondor2).

The entry's ``options.grid_resource`` says where the pilots go, as HTCondor
spells it: ``ec2 https://ec2.us-east-1.amazonaws.com`` (HTCondor's EC2 GAHP
starts a VM from ``image``/``flavor`` with the envelope as its user data),
or ``condor ce.example.org ce.example.org:9619``, ``arc arc.example.org``,
``batch slurm user@login.example.org`` for grid sites, where the pilot is
``options.executable`` (the wrapper) run with the envelope as an argument.
``options.schedd`` / ``options.collector`` name the schedd (default: the
local one).

Credentials never go in a submit description: the provisioning connection's
secret is written to a file readable by its owner only and the description
names the file (``ec2_access_key_id``/``ec2_secret_access_key`` from an
``aws`` connection; ``x509userproxy`` from a ``glidein_x509`` proxy;
``scitokens_file`` from a ``glidein_token``; or extra ``x509_proxy_file`` /
``token_file`` naming files already on the schedd host).

Our ids are job attributes (GlideinFactory, GlideinEntry, GlideinFrontend,
GlideinLaunch, GlideinRequest); listing ours is one schedd query by them. A
batch is one cluster (``count`` procs), one call. Held pilots are released
up to ``options.max_releases`` times (default 3) when the factory lists
them, then removed, with the hold reason in the log and in the pilot's detail.
Terminate is ``condor_rm``; its forced variant ``condor_rm -forcex`` (a grid
job removed but not yet confirmed by the remote side stays in state X).
"""

from __future__ import annotations

import base64
import logging
import os
from functools import cached_property
from typing import Any

import classad2
import htcondor2

from airflow_glidein import pilots as P
from airflow_glidein.hooks.base import LaunchSpec, PilotHook, Refusals
from airflow_glidein.hooks.htcondor import HTCondorHook

log = logging.getLogger(__name__)

ATTR = {P.TAG_FACTORY: "GlideinFactory", P.TAG_FRONTEND: "GlideinFrontend", P.TAG_ENTRY: "GlideinEntry",
        P.TAG_LAUNCH: "GlideinLaunch", P.TAG_REQUEST: "GlideinRequest"}
RELEASES = "GlideinReleases"  # how many times we released this pilot from hold
PROJECTION = ["ClusterId", "ProcId", "JobStatus", "QDate", "HoldReason", "GridJobId", "GridJobStatus", RELEASES,
              *ATTR.values()]
IDLE, RUNNING, REMOVED, COMPLETED, HELD, TRANSFERRING, SUSPENDED = 1, 2, 3, 4, 5, 6, 7
STATE = {IDLE: P.P_PENDING, RUNNING: P.P_RUNNING, REMOVED: P.P_TERMINATING, COMPLETED: P.P_TERMINATED,
         HELD: P.P_ERROR, TRANSFERRING: P.P_RUNNING, SUSPENDED: P.P_STOPPED}


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
        if self.grid_resource.startswith("ec2 "):
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

    def description(self, spec: LaunchSpec, tags: dict[str, str]) -> htcondor2.Submit:
        opts = self.entry.options
        envelope = base64.b64encode(spec.userdata.encode()).decode()
        sub: dict[str, str] = {
            "universe": "grid",
            "grid_resource": self.grid_resource,
            "executable": str(opts.get("executable") or "glidein-pilot"),
            "notification": "never",
            **{f"MY.{ATTR[k]}": classad2.quote(str(v)) for k, v in tags.items() if k in ATTR},
            **self.credential_commands(),
        }
        if self.grid_resource.startswith("ec2 "):
            sub.update(ec2_ami_id=spec.image, ec2_instance_type=str(self.entry.flavor),
                       ec2_user_data=envelope, ec2_tag_names="GlideinLaunch",
                       ec2_tag_GlideinLaunch=spec.launch_id)
            for key in ("ec2_keypair", "ec2_security_groups", "ec2_vpc_subnet"):
                if opts.get(key):
                    sub[key] = str(opts[key])
        else:
            sub.update(arguments=f"-entry {self.entry.name} -launch {spec.launch_id} -envelope {envelope}",
                       transfer_executable="true", request_cpus=str(self.entry.cores),
                       request_memory=str(self.entry.memory_mb))
            if self.entry.gpus:
                sub["request_gpus"] = str(self.entry.gpus)
        if opts.get("log_dir"):
            base = os.path.join(opts["log_dir"], "pilot.$(Cluster).$(Process)")
            sub.update(output=base + ".out", error=base + ".err", log=os.path.join(opts["log_dir"], "pilots.log"))
        return htcondor2.Submit(sub)

    # -- the interface ---------------------------------------------------------
    def _constraint(self, launch_id: str | None) -> str:
        parts = [f"{ATTR[P.TAG_FACTORY]} == {classad2.quote(self.factory)}",
                 f"{ATTR[P.TAG_ENTRY]} == {classad2.quote(self.entry.name)}"]
        if launch_id:
            parts.append(f"{ATTR[P.TAG_LAUNCH]} == {classad2.quote(launch_id)}")
        return " && ".join(parts)

    def _ads(self, launch_id: str | None = None) -> list[classad2.ClassAd]:
        return self.api_call(lambda: self.schedd.query(constraint=self._constraint(launch_id), projection=PROJECTION),
                             "schedd query")

    def _list(self, launch_id: str | None = None) -> list[P.ProviderInstance]:
        return [_instance(ad) for ad in self._ads(launch_id)]

    def _create(self, spec: LaunchSpec, count: int, tags: dict[str, str]) -> list[P.ProviderInstance]:
        sub = self.description(spec, tags)
        result = self.api_call(lambda: self.schedd.submit(sub, count=count), "submit")
        cluster = result.cluster()
        return [P.ProviderInstance(id=f"{cluster}.{proc}", state=P.P_PENDING, launched=0.0, tags=dict(tags))
                for proc in range(result.first_proc(), result.first_proc() + result.num_procs())]

    def _act(self, action: htcondor2.JobAction, ids: list[str], reason: str) -> Refusals:
        ad = self.api_call(lambda: self.schedd.act(action, list(ids), reason=reason), f"{action.name}")
        done = int(ad.get("TotalSuccess", len(ids))) if ad is not None else len(ids)
        if done < len(ids):
            log.info("%s: %d of %d pilots acted on; the listing tells which remain", action.name, done, len(ids))
        return {}

    def _terminate(self, ids: list[str]) -> Refusals:
        return self._act(htcondor2.JobAction.Remove, ids, "glidein factory: terminate")

    def _force_terminate(self, ids: list[str]) -> Refusals:
        return self._act(htcondor2.JobAction.RemoveX, ids, "glidein factory: terminate (forcex)")

    def list_pilots(self) -> list[P.ProviderInstance]:
        """Our pilots; held ones are released (up to max_releases) or removed, with the hold reason."""
        ads = self._ads()
        out = {f"{ad['ClusterId']}.{ad['ProcId']}": _instance(ad) for ad in ads}
        held = [ad for ad in ads if ad.get("JobStatus") == HELD]
        if not held:
            return list(out.values())
        limit = int(self.entry.options.get("max_releases", 3))
        by_count: dict[int, list[str]] = {}
        remove: list[str] = []
        for ad in held:
            jid, n = f"{ad['ClusterId']}.{ad['ProcId']}", int(ad.get(RELEASES, 0) or 0)
            why = str(ad.get("HoldReason", "no hold reason given"))
            if n < limit:
                by_count.setdefault(n, []).append(jid)
                out[jid].state, out[jid].detail = P.P_PENDING, f"released from hold ({n + 1} of {limit}): {why}"
            else:
                remove.append(jid)
                out[jid].state, out[jid].detail = P.P_TERMINATING, f"removed after {n} releases: {why}"
                log.warning("Pilot %s at %s held again after %d releases, removed: %s", jid, self.entry.name, n, why)
        for n, jids in sorted(by_count.items()):
            self.api_call(lambda jids=jids, n=n: self.schedd.edit(jids, RELEASES, str(n + 1)), "edit")
            self._act(htcondor2.JobAction.Release, jids, "glidein factory: release held pilot")
            log.info("Released %d held pilots at %s (release %d of %d)", len(jids), self.entry.name, n + 1, limit)
        if remove:
            self._act(htcondor2.JobAction.Remove, remove, f"glidein factory: held after {limit} releases")
        return list(out.values())

    def test_connection(self) -> tuple[bool, str]:
        try:
            n = len(self.schedd.query(constraint="false", projection=["ClusterId"]))
            return True, f"schedd answered ({n} jobs)"
        except Exception as exc:
            return False, str(exc)


def _instance(ad: classad2.ClassAd) -> P.ProviderInstance:
    status = int(ad.get("JobStatus", 0))
    detail = {HELD: f"held: {ad.get('HoldReason', '')}"}.get(status, str(ad.get("GridJobStatus", "")))
    return P.ProviderInstance(
        id=f"{ad['ClusterId']}.{ad['ProcId']}",
        state=STATE.get(status, P.P_ERROR),
        launched=float(ad.get("QDate", 0) or 0),
        tags={tag: str(ad[attr]) for tag, attr in ATTR.items() if attr in ad},
        detail=detail,
    )
