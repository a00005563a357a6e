"""OpenNebula pilots through pyone (XML-RPC) and a ``glidein_opennebula`` connection.

The connection's host is the XML-RPC endpoint (``http://one.example.org:2633/RPC2``),
login and password the OpenNebula user (airflow_glidein.secrets). The entry's ``flavor`` names the VM
template (id or name), ``image`` the image (id or name) put in the
template's first DISK; VCPU and MEMORY come from the entry's cores and memory.

Contextualization: the UserData goes in CONTEXT as ``USER_DATA`` with
``USERDATA_ENCODING=base64`` (what one-context and cloud-init's OpenNebula
datasource read). An extra template that holds CONTEXT replaces the
template's whole CONTEXT, so the template's own CONTEXT (network, SSH key,
REPORT_READY, ...) is read first and sent back with ours added; the same
for DISK. Our ids go in the user template (GLIDEIN_FACTORY, ...).

OpenNebula has no batch call: one instantiate and one action per VM, each
through the API budget. Listing ours is ``one.vmpool.infoextended`` (the
plain pool info leaves out the user template), paged, filtered here: a
pool filter string needs oned on MySQL. Terminate is refused while a VM is
in PROLOG or BOOT; the refusal is reported and the VM tried again; a guest
that ignores the shutdown is ended with terminate-hard (the force step).
Transport failures reach pyone as requests or xmlrpc errors, not
OneException; throttling backs off: HTTP 429/503 from a proxy in front of
oned, and oned's own answer under load, which is in-band. Its XML-RPC server
has no rate limit (connections past MAX_CONN wait in the kernel's backlog);
what it refuses is a write (a leader-only method) while its HA zone cannot
serve one, e.g. when a loaded leader missed heartbeats: an INTERNAL failure
"Cannot process request, oned cluster in election mode" (or "... is
replicating log", "... no leader found"), answered before the call executes,
so trying again later never makes a VM twice.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import xmlrpc.client
from functools import cached_property
from typing import Any

from airflow_glidein import budget as B
from airflow_glidein import pilots as P
from airflow_glidein.hooks.base import LaunchSpec, PilotHook, Refusals

log = logging.getLogger(__name__)

# Our tags as OpenNebula attribute names (letters, digits, underscore).
ATTR = {P.TAG_FACTORY: "GLIDEIN_FACTORY", P.TAG_FRONTEND: "GLIDEIN_FRONTEND", P.TAG_ENTRY: "GLIDEIN_ENTRY",
        P.TAG_LAUNCH: "GLIDEIN_LAUNCH", P.TAG_REQUEST: "GLIDEIN_REQUEST"}
TAG = {v: k for k, v in ATTR.items()}
# VM_STATE -> provider state; ACTIVE (3) is decided by the LCM state.
VM_STATE = {0: P.P_PENDING, 1: P.P_PENDING, 2: P.P_PENDING, 4: P.P_STOPPED, 5: P.P_STOPPED, 6: P.P_TERMINATED,
            7: P.P_ERROR, 8: P.P_STOPPED, 9: P.P_STOPPED, 10: P.P_PENDING, 11: P.P_ERROR}
LCM_PENDING = {0, 1, 2, 9}  # LCM_INIT, PROLOG, BOOT, PROLOG_MIGRATE
LCM_RUNNING = {3, 4, 17, 18, 20, 24, 25, 26, 27, 28, 53, 54, 55, 56, 62, 63, 64}  # running, migrating, hotplug...
LCM_TERMINATING = {10, 11, 12, 13, 15, 23}  # EPILOG_STOP, EPILOG, SHUTDOWN, CANCEL, CLEANUP_*
THROTTLE_STATUS = (429, 503)
# oned's in-band "not now" (RequestXRPC): a zone that cannot take writes at the moment. Not "zone disabled",
# which an operator set and which no backoff outlasts.
OVERLOADED = re.compile(r"Cannot process request, (oned cluster in election mode|oned cluster is replicating log"
                        r"|no leader found)")


class OpenNebulaPilotHook(PilotHook):
    middleware = "opennebula"
    conn_name_attr = "opennebula_conn_id"
    default_conn_name = "opennebula_default"
    conn_type = "glidein_opennebula"
    hook_name = "Glidein pilots on OpenNebula"
    page_size = 1000

    @cached_property
    def one(self) -> Any:
        import pyone

        from airflow_glidein.secrets import OpenNebulaCredentialHook

        cred = OpenNebulaCredentialHook(self.conn_id)  # a glidein_opennebula connection, secrets masked
        endpoint, session = cred.session()
        return pyone.OneServer(endpoint, session=session, https_verify=cred.fields.extra.get("verify", True),
                               protocol="xmlrpc")

    def _call(self, method: str, *args: Any) -> Any:
        fn = self.one
        for part in method.split("."):
            fn = getattr(fn, part)
        return self.api_call(lambda: fn(*args), f"one.{method}")

    def _throttled(self, outcome: Any) -> float | None:
        import pyone

        if isinstance(outcome, xmlrpc.client.ProtocolError) and outcome.errcode in THROTTLE_STATUS:
            try:
                return float((outcome.headers or {}).get("Retry-After", 0))
            except ValueError:
                return 0.0
        if isinstance(outcome, pyone.OneInternalException) and OVERLOADED.search(str(outcome)):
            return 0.0  # oned gives no hint: the base class's full-jitter backoff decides
        return None

    # -- the VM template -----------------------------------------------------
    @cached_property
    def template(self) -> tuple[int, dict]:
        """(id, TEMPLATE) of the entry's VM template, read once per hook."""
        ref = str(self.entry.flavor)
        if ref.isdigit():
            body = self._call("template.info", int(ref))
            return int(ref), dict(body.TEMPLATE)
        pool = self._call("templatepool.info", -2, -1, -1)
        found = [t for t in pool.VMTEMPLATE if t.NAME == ref]
        if len(found) != 1:
            raise ValueError(f"Entry {self.entry.name}: {len(found)} OpenNebula templates named {ref!r} (need one)")
        return int(found[0].ID), dict(found[0].TEMPLATE)

    def extra_template(self, spec: LaunchSpec, tags: dict[str, str]) -> dict:
        """The extra template for one VM: CONTEXT and DISK merged with the template's own (they replace whole)."""
        _, tmpl = self.template
        context = dict(tmpl.get("CONTEXT") or {})
        context.update(USER_DATA=base64.b64encode(spec.userdata.encode()).decode(), USERDATA_ENCODING="base64")
        disks = tmpl.get("DISK") or {}
        disks = [dict(d) for d in disks] if isinstance(disks, list) else [dict(disks)]
        first = {k: v for k, v in disks[0].items() if k not in ("IMAGE", "IMAGE_ID", "IMAGE_UNAME", "IMAGE_UID")}
        image = str(spec.image)
        first.update({"IMAGE_ID": image} if image.isdigit() else {"IMAGE": image})
        if self.entry.options.get("image_uname"):
            first["IMAGE_UNAME"] = self.entry.options["image_uname"]
        disks[0] = first
        body: dict[str, Any] = {
            "CONTEXT": context,
            "DISK": disks if len(disks) > 1 else disks[0],
            "VCPU": str(self.entry.cores),
            "MEMORY": str(self.entry.memory_mb),
        }
        body.update({ATTR[k]: str(v) for k, v in tags.items() if k in ATTR})
        return {"TEMPLATE": body}

    def vm_name(self, launch_id: str, n: int) -> str:
        return f"glidein-{self.factory}-{self.entry.name}-{hashlib.sha256(launch_id.encode()).hexdigest()[:10]}-{n}"

    # -- the interface ---------------------------------------------------------
    def _list(self, launch_id: str | None = None) -> list[P.ProviderInstance]:
        return [i for i in self._pool(launch_id) if i.tags.get(P.TAG_ENTRY) == self.entry.name]

    def listing_scope(self) -> tuple:
        return ("opennebula",)  # the connection names the endpoint and user: their whole pool

    def _list_all(self) -> list[P.ProviderInstance]:
        return self._pool()  # the user's VM pool holds every entry's VMs: one pass for all

    def _pool(self, launch_id: str | None = None) -> list[P.ProviderInstance]:
        out, offset = [], 0
        while True:
            # -3: this user's VMs; offset and -page size; -1: any state but DONE; "": no pool filter
            page = self._call("vmpool.infoextended", -3, offset, -self.page_size, -1, "").VM
            for vm in page:
                user = dict(vm.USER_TEMPLATE or {})
                if user.get("GLIDEIN_FACTORY") != self.factory:
                    continue
                if launch_id and user.get("GLIDEIN_LAUNCH") != launch_id:
                    continue
                out.append(_instance(vm))
            if len(page) < self.page_size:
                return out
            offset += self.page_size

    def _create(self, spec: LaunchSpec, count: int, tags: dict[str, str]) -> list[P.ProviderInstance]:
        tid, _ = self.template
        extra = self.extra_template(spec, tags)
        made = []
        for n in range(count):  # no batch call in OpenNebula
            vid = self._call("template.instantiate", tid, self.vm_name(spec.launch_id, n), False, extra, False)
            made.append(P.ProviderInstance(id=str(vid), state=P.P_PENDING, launched=B.CLOCK.time(), tags=dict(tags)))
        return made

    def _act(self, action: str, ids: list[str]) -> Refusals:
        import pyone

        refused = {}
        for vid in ids:
            try:
                self._call("vm.action", action, int(vid))
            except pyone.OneNoExistsException:
                continue
            except pyone.OneActionException as exc:  # e.g. not available in PROLOG/BOOT: try again later
                refused[vid] = str(exc)[:300]
        return refused

    def _terminate(self, ids: list[str]) -> Refusals:
        return self._act("terminate", ids)

    def _force_terminate(self, ids: list[str]) -> Refusals:
        return self._act("terminate-hard", ids)

    def quota(self) -> dict[str, int] | None:
        """The user's VM quota left: VMs and memory. (Its CPU quota counts the CPU share, not the
        VCPUs a pilot gets, so cores are not bounded here.) -1 means the default quota, -2 none."""
        def first(x: Any) -> Any:  # pyone gives the user's VM record as a list, the default's as one object
            return (x or [None])[0] if isinstance(x, list) else x

        user = self._call("user.info", -1)
        vm = first(user.VM_QUOTA.VM if user.VM_QUOTA is not None else None)
        base = first(getattr(user.DEFAULT_USER_QUOTAS.VM_QUOTA, "VM", None) if user.DEFAULT_USER_QUOTAS else None)
        if vm is None:
            return {}  # no quota record for this user: nothing limits it
        out = {}
        for name, attr in (("instances", "VMS"), ("memory_mb", "MEMORY")):
            limit = float(getattr(vm, attr, None) or -2)
            if limit == -1:
                limit = float(getattr(base, attr, None) or -2) if base is not None else -2
            if limit >= 0:
                out[name] = max(int(limit - float(getattr(vm, f"{attr}_USED", None) or 0)), 0)
        return out

    def entry_checks(self) -> list[tuple[str, Any]]:
        def template() -> tuple[bool, str]:
            tid, _ = self.template
            return True, f"template {tid} (each VM gets the entry's VCPU and MEMORY)"

        return [(f"template {self.entry.flavor}", template)]

    def test_connection(self) -> tuple[bool, str]:
        try:
            return True, f"OpenNebula {self._call('system.version')}"
        except Exception as exc:
            return False, str(exc)


def _instance(vm: Any) -> P.ProviderInstance:
    import pyone

    state, lcm = int(vm.STATE), int(vm.LCM_STATE)
    if state == 3:
        if lcm in LCM_PENDING:
            pstate = P.P_PENDING
        elif lcm in LCM_RUNNING:
            pstate = P.P_RUNNING
        elif lcm in LCM_TERMINATING:
            pstate = P.P_TERMINATING
        else:  # *_FAILURE, UNKNOWN
            pstate = P.P_ERROR
    else:
        pstate = VM_STATE.get(state, P.P_ERROR)
    user = dict(vm.USER_TEMPLATE or {})
    return P.ProviderInstance(
        id=str(vm.ID),
        state=pstate,
        launched=float(vm.STIME or 0),
        tags={TAG[k]: "" if v is None else str(v) for k, v in user.items() if k in TAG},
        detail=_state_name(pyone.VM_STATE, state) + (f"/{_state_name(pyone.LCM_STATE, lcm)}" if state == 3 else ""),
    )


def _state_name(enum: Any, value: int) -> str:
    try:
        return enum(value).name
    except ValueError:
        return str(value)
