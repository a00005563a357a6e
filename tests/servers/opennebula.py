"""A small OpenNebula XML-RPC server on 127.0.0.1 for the real pyone client.

It answers the calls pyone makes for pilots, in oned 6.10's shapes
([success, result, error code]; pool and object bodies as XML):
one.system.version, one.template.info, one.templatepool.info,
one.template.instantiate, one.vmpool.info (the short body: no CONTEXT, no
user template), one.vmpool.infoextended (full bodies; ID ranges or
offset/page-size paging; state -1 = all but DONE, -2 = all), one.vm.info and
one.vm.action (terminate, terminate-hard).

It follows oned where the hook depends on it: an extra template's CONTEXT
replaces the template's whole CONTEXT (so does any attribute the extra
template names); attributes the VM template does not know go to the
VM's USER_TEMPLATE; terminate and terminate-hard are refused while a VM is
in PROLOG or BOOT ("not available for state"); DONE VMs leave the
"all but DONE" listing and stay visible through one.vm.info; a pool filter
string is refused (oned on SQLite). VM ids count from 0 after every reset, as a
fresh oned does, so two servers hand out the same ids. Switches:
  boot_state            LCM state new VMs stay in (RUNNING by default; BOOT, PROLOG)
  ignore_terminate(ids) these VMs accept terminate and keep running (guest ignores ACPI)
  lose_instantiate_responses  the next N instantiates make their VM, then drop the connection
  throttle.set(n, w)    HTTP 503 (``throttle_status``) with Retry-After beyond n calls in w seconds
                        (or ``throttle.random(share, seed)``: a seeded share of calls)
  overload              answer the throttled calls in-band instead, as oned does: its XML-RPC
                        server has no rate limit (connections beyond MAX_CONN + MAX_CONN_BACKLOG
                        wait or are refused by the kernel), and the refusal a client reads is the
                        one a loaded HA zone gives writes (leader-only methods) when the leader
                        misses heartbeats: [false, "[one.x] Cannot process request, oned cluster
                        in election mode", 0x2000] ("election"; also "replicating": "... oned
                        cluster is replicating log", "no_leader": "... no leader found"), refused
                        before it executes; info and pool calls are still answered
  lag                   VMs made less than ``lag`` s ago (by ``clock``) are missing from the pool
                        listings, and one.vm.info answers them as unknown ids (NO_EXISTS)
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
import xmlrpc.client
from xml.sax.saxutils import escape

from tests.servers.common import QuickHandler, TestServer

STATES = {"INIT": 0, "PENDING": 1, "HOLD": 2, "ACTIVE": 3, "STOPPED": 4, "SUSPENDED": 5, "DONE": 6,
          "FAILED": 7, "POWEROFF": 8, "UNDEPLOYED": 9}
LCM = {"LCM_INIT": 0, "PROLOG": 1, "BOOT": 2, "RUNNING": 3, "SHUTDOWN": 12, "UNKNOWN": 16, "BOOT_FAILURE": 36}
LCM_NAME = {v: k for k, v in LCM.items()}
# What oned keeps in the VM's TEMPLATE; everything else goes to USER_TEMPLATE.
SYSTEM_ATTRS = {"NAME", "CPU", "VCPU", "MEMORY", "DISK", "NIC", "NIC_ALIAS", "NIC_DEFAULT", "PCI", "CONTEXT",
                "GRAPHICS", "INPUT", "OS", "FEATURES", "RAW", "SCHED_REQUIREMENTS", "SCHED_RANK",
                "SCHED_DS_REQUIREMENTS", "SCHED_DS_RANK", "TOPOLOGY", "NUMA_NODE", "CPU_MODEL", "TEMPLATE_ID",
                "VMID", "MEMORY_MAX", "VCPU_MAX", "SECURITY_GROUP_RULE", "AUTOMATIC_REQUIREMENTS"}
AUTH, NO_EXISTS, ACTION, INTERNAL = 0x0100, 0x0400, 0x0800, 0x2000
# oned's in-band refusals of leader-only (writing) methods while its HA zone cannot serve them
OVERLOAD = {"election": "Cannot process request, oned cluster in election mode",
            "replicating": "Cannot process request, oned cluster is replicating log",
            "no_leader": "Cannot process request, no leader found"}
LEADER_ONLY = {"one.template.instantiate", "one.vm.action"}  # the writes of this subset


def _tmpl_xml(tag: str, attrs: dict) -> str:
    out = [f"<{tag}>"]
    for k, v in attrs.items():
        for item in v if isinstance(v, list) else [v]:
            if isinstance(item, dict):
                out.append(_tmpl_xml(k, item))
            else:
                out.append(f"<{k}><![CDATA[{item}]]></{k}>")
    out.append(f"</{tag}>")
    return "".join(out)


def _from_xml(elem: ET.Element) -> dict:
    out: dict = {}
    for child in elem:
        value = _from_xml(child) if len(child) else (child.text or "")
        if child.tag in out:
            prev = out[child.tag]
            out[child.tag] = (prev if isinstance(prev, list) else [prev]) + [value]
        else:
            out[child.tag] = value
    return out


def parse_template(text: str) -> dict:
    """An extra template as oned reads it: XML (<TEMPLATE>...) or attribute syntax (KEY="v", KEY=[A="b"])."""
    text = text.strip()
    if not text:
        return {}
    if text.startswith("<"):
        return _from_xml(ET.fromstring(text))
    out: dict = {}
    i, n = 0, len(text)

    def value(i: int) -> tuple[str, int]:
        if text[i] == '"':
            j, buf = i + 1, []
            while text[j] != '"':
                if text[j] == "\\" and text[j + 1] in '"\\':
                    j += 1
                buf.append(text[j])
                j += 1
            return "".join(buf), j + 1
        j = i
        while j < n and text[j] not in ",]\n":
            j += 1
        return text[i:j].strip(), j

    def name(i: int) -> tuple[str, int]:
        j = i
        while text[j] not in "= \t":
            j += 1
        key = text[i:j].upper()
        while text[j] in " \t=":
            j += 1
        return key, j

    while i < n:
        if text[i].isspace():
            i += 1
            continue
        key, i = name(i)
        if text[i] == "[":
            vec: dict = {}
            i += 1
            while True:
                while text[i] in " \t\n,":
                    i += 1
                if text[i] == "]":
                    i += 1
                    break
                k, i = name(i)
                vec[k], i = value(i)
            val: object = vec
        else:
            val, i = value(i)
        if key in out:
            prev = out[key]
            out[key] = (prev if isinstance(prev, list) else [prev]) + [val]
        else:
            out[key] = val
    return out


class OneServer(TestServer):
    """oned's XML-RPC endpoint at /RPC2, one user (``session``), one VM template."""

    def __init__(self) -> None:
        super().__init__(_Handler)
        self.session = "glidein:one-secret"
        self.uid, self.uname, self.gid, self.gname = 7, "glidein", 100, "users"
        self.templates = {
            4: {"NAME": "glidein-pilot", "TEMPLATE": {
                "CPU": "1", "VCPU": "2", "MEMORY": "4096",
                "DISK": {"IMAGE_ID": "12", "DEV_PREFIX": "vd", "SIZE": "20480"},
                "NIC": {"NETWORK": "private", "NETWORK_UNAME": "oneadmin"},
                "GRAPHICS": {"LISTEN": "0.0.0.0", "TYPE": "VNC"},
                "CONTEXT": {"NETWORK": "YES", "SSH_PUBLIC_KEY": "$USER[SSH_PUBLIC_KEY]", "SET_HOSTNAME": "$NAME",
                            "REPORT_READY": "YES"},
                "LOGO": "images/logos/centos.png",
            }},
        }
        self.images = {"12": "alma9-glidein", "13": "alma9-glidein-gpu"}
        self.vms: dict[int, dict] = {}
        self.throttle_status = 503
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.vms.clear()
            self.next_id = 0
            self.calls.clear()
            self.throttle.set(None)
            self.overload: str | None = None
            self.lag = 0.0
            self.boot_state = "RUNNING"
            self.lose_instantiate_responses = 0
            self._ignore: set[int] = set()
            self.quota_vms = self.quota_memory = "-2"  # the user's VM quota: -2 unlimited, -1 the default's
            self.default_quota_vms = "-2"

    # -- test controls --------------------------------------------------------
    def ignore_terminate(self, ids) -> None:
        with self.lock:
            self._ignore |= {int(i) for i in ids}

    def set_lcm(self, ids, lcm: str) -> None:
        with self.lock:
            for i in ids:
                self.vms[int(i)]["STATE"], self.vms[int(i)]["LCM_STATE"] = STATES["ACTIVE"], LCM[lcm]

    def listed(self, vm: dict) -> bool:
        """False while the pool listing has not caught up with this VM (``lag``)."""
        return self.clock.time() - vm["CREATED"] >= self.lag

    def live(self) -> list[dict]:
        with self.lock:
            return [v for v in self.vms.values() if v["STATE"] != STATES["DONE"]]

    def connection_json(self) -> str:
        user, password = self.session.split(":", 1)
        return ('{"conn_type": "glidein_opennebula", "host": "%s/RPC2", "login": "%s", "password": "%s"}'
                % (self.base, user, password))

    # -- the model ---------------------------------------------------------------
    def vm_xml(self, vm: dict, extended: bool = True) -> str:
        template = dict(vm["TEMPLATE"])
        user = vm["USER_TEMPLATE"]
        if not extended:  # oned's short pool body
            template = {k: v for k, v in template.items() if k in ("CPU", "VCPU", "MEMORY", "NIC", "GRAPHICS")}
            user = {}
        perms = "".join(f"<{p}_{r}>{int(p == 'OWNER' and r in 'UM')}</{p}_{r}>"
                        for p in ("OWNER", "GROUP", "OTHER") for r in "UMA")
        return (
            f"<VM><ID>{vm['ID']}</ID><UID>{self.uid}</UID><GID>{self.gid}</GID><UNAME>{self.uname}</UNAME>"
            f"<GNAME>{self.gname}</GNAME><NAME>{escape(vm['NAME'])}</NAME><PERMISSIONS>{perms}</PERMISSIONS>"
            f"<LAST_POLL>0</LAST_POLL><STATE>{vm['STATE']}</STATE><LCM_STATE>{vm['LCM_STATE']}</LCM_STATE>"
            f"<PREV_STATE>{vm['STATE']}</PREV_STATE><PREV_LCM_STATE>{vm['LCM_STATE']}</PREV_LCM_STATE>"
            f"<RESCHED>0</RESCHED><STIME>{vm['STIME']}</STIME><ETIME>{vm['ETIME']}</ETIME>"
            f"<DEPLOY_ID>one-{vm['ID']}</DEPLOY_ID><MONITORING/>"
            + _tmpl_xml("TEMPLATE", template) + _tmpl_xml("USER_TEMPLATE", user) + "<HISTORY_RECORDS/></VM>"
        )

    def user_xml(self) -> str:
        """one.user.info: the user with its VM quota and usage (VMs not DONE, their MEMORY)."""
        live = [v for v in self.vms.values() if v["STATE"] != STATES["DONE"]]
        memory = sum(int(float(v["TEMPLATE"].get("MEMORY", 0))) for v in live)
        unlimited = {k: "-2" for k in ("CPU", "RUNNING_CPU", "RUNNING_MEMORY", "RUNNING_VMS", "SYSTEM_DISK_SIZE")}
        vm = {**unlimited, "MEMORY": self.quota_memory, "VMS": self.quota_vms}
        used = {"CPU": "0", "RUNNING_CPU": "0", "RUNNING_MEMORY": "0", "RUNNING_VMS": "0", "SYSTEM_DISK_SIZE": "0",
                "MEMORY": str(memory), "VMS": str(len(live))}
        body = "".join(f"<{k}>{vm[k]}</{k}><{k}_USED>{used[k]}</{k}_USED>" for k in sorted(vm))
        default = "".join(f"<{k}>{self.default_quota_vms if k == 'VMS' else '-2'}</{k}><{k}_USED>0</{k}_USED>"
                          for k in sorted(vm))
        return (f"<USER><ID>{self.uid}</ID><GID>{self.gid}</GID><GROUPS><ID>{self.gid}</ID></GROUPS>"
                f"<GNAME>{self.gname}</GNAME><NAME>{self.uname}</NAME><PASSWORD>-</PASSWORD>"
                f"<AUTH_DRIVER>core</AUTH_DRIVER><ENABLED>1</ENABLED><LOGIN_TOKEN/><TEMPLATE/>"
                f"<DATASTORE_QUOTA/><NETWORK_QUOTA/><VM_QUOTA><VM>{body}</VM></VM_QUOTA><IMAGE_QUOTA/>"
                f"<DEFAULT_USER_QUOTAS><DATASTORE_QUOTA/><NETWORK_QUOTA/><VM_QUOTA><VM>{default}</VM></VM_QUOTA>"
                f"<IMAGE_QUOTA/></DEFAULT_USER_QUOTAS></USER>")

    def template_xml(self, tid: int, body: dict) -> str:
        return (f"<VMTEMPLATE><ID>{tid}</ID><UID>0</UID><GID>0</GID><UNAME>oneadmin</UNAME><GNAME>oneadmin</GNAME>"
                f"<NAME>{escape(body['NAME'])}</NAME><PERMISSIONS><OWNER_U>1</OWNER_U><OWNER_M>1</OWNER_M>"
                f"<OWNER_A>0</OWNER_A><GROUP_U>1</GROUP_U><GROUP_M>0</GROUP_M><GROUP_A>0</GROUP_A><OTHER_U>1</OTHER_U>"
                f"<OTHER_M>0</OTHER_M><OTHER_A>0</OTHER_A></PERMISSIONS><REGTIME>1700000000</REGTIME>"
                + _tmpl_xml("TEMPLATE", body["TEMPLATE"]) + "</VMTEMPLATE>")

    def instantiate(self, tid: int, name: str, hold: bool, extra: str, persistent: bool = False) -> list:
        tmpl = self.templates.get(tid)
        if tmpl is None:
            return [False, f"[one.template.instantiate] Error getting template [{tid}].", NO_EXISTS]
        try:
            extra_attrs = parse_template(extra)
        except Exception as exc:
            return [False, f"[one.template.instantiate] Error parsing extra template: {exc}", INTERNAL]
        merged = dict(tmpl["TEMPLATE"])
        merged.update(extra_attrs)  # an attribute in the extra template replaces the template's, vectors whole
        live = sum(v["STATE"] != STATES["DONE"] for v in self.vms.values())
        limit = int(self.default_quota_vms if self.quota_vms == "-1" else self.quota_vms)
        if 0 <= limit <= live:
            return [False, f"[one.template.instantiate] User [{self.uid}] : user [{self.uid}] limit of "
                           f"{limit} reached for VMS quota in VM.", INTERNAL]
        for disk in merged["DISK"] if isinstance(merged.get("DISK"), list) else [merged.get("DISK") or {}]:
            if disk.get("IMAGE_ID") and disk["IMAGE_ID"] not in self.images:
                return [False, f"[one.template.instantiate] Error: IMAGE_ID {disk['IMAGE_ID']} does not exist",
                        INTERNAL]
        vid = self.next_id
        self.next_id += 1
        name = name or f"{tmpl['NAME']}-{vid}"
        system = {k: v for k, v in merged.items() if k in SYSTEM_ATTRS}
        if isinstance(system.get("CONTEXT"), dict):
            ctx = dict(system["CONTEXT"])
            for k, v in ctx.items():
                if v == "$NAME":
                    ctx[k] = name
            system["CONTEXT"] = ctx
        system["TEMPLATE_ID"], system["VMID"] = str(tid), str(vid)
        lcm = self.boot_state
        self.vms[vid] = {
            "ID": vid, "NAME": name, "STATE": STATES["HOLD"] if hold else STATES["ACTIVE"],
            "LCM_STATE": 0 if hold else LCM[lcm], "STIME": int(self.clock.time()), "ETIME": 0,
            "CREATED": self.clock.time(),
            "TEMPLATE": system, "USER_TEMPLATE": {k: v for k, v in merged.items() if k not in SYSTEM_ATTRS},
        }
        return [True, vid, 0]

    def pool(self, flt: int, start: int, end: int, state: int, filter_str: str = "", extended: bool = True) -> list:
        if filter_str:
            return [False, "[one.vmpool.info] Filtering the pool by attribute needs oned on MySQL", INTERNAL]
        vms = sorted((v for v in self.vms.values() if self.listed(v)), key=lambda v: v["ID"])
        if state == -1:
            vms = [v for v in vms if v["STATE"] != STATES["DONE"]]
        elif state >= 0:
            vms = [v for v in vms if v["STATE"] == state]
        if start != -1 and end < -1:  # offset and page size
            vms = vms[start : start - end]
        else:
            vms = [v for v in vms if (start == -1 or v["ID"] >= start) and (end == -1 or v["ID"] <= end)]
        return [True, "<VM_POOL>" + "".join(self.vm_xml(v, extended) for v in vms) + "</VM_POOL>", 0]

    def action(self, action: str, vid: int) -> list:
        vm = self.vms.get(vid)
        if vm is None:
            return [False, f"[one.vm.action] Error getting virtual machine [{vid}].", NO_EXISTS]
        state, lcm = vm["STATE"], vm["LCM_STATE"]
        if action not in ("terminate", "terminate-hard"):
            return [False, f"[one.vm.action] action {action} is not emulated", INTERNAL]
        if state == STATES["DONE"] or (state == STATES["ACTIVE"] and lcm not in (LCM["RUNNING"], LCM["UNKNOWN"],
                                                                                   LCM["SHUTDOWN"])):
            where = "DONE" if state == STATES["DONE"] else LCM_NAME.get(lcm, str(lcm))
            return [False, f'[one.vm.action] Error performing action "{action}": This action is not available '
                           f"for state {where}", ACTION]
        if action == "terminate" and vid in self._ignore:
            vm["LCM_STATE"] = LCM["RUNNING"]  # shutdown timed out without FORCE_DESTROY: back to RUNNING
            return [True, vid, 0]
        vm["STATE"], vm["LCM_STATE"], vm["ETIME"] = STATES["DONE"], 0, int(self.clock.time())
        return [True, vid, 0]

    def dispatch(self, method: str, params: tuple) -> list:
        if not params or params[0] != self.session:
            return [False, f"[{method}] User couldn't be authenticated, aborting call.", AUTH]
        args = params[1:]
        with self.lock:
            if method == "one.system.version":
                return [True, "6.10.0", 0]
            if method == "one.template.info":
                body = self.templates.get(int(args[0]))
                if body is None:
                    return [False, f"[one.template.info] Error getting template [{args[0]}].", NO_EXISTS]
                return [True, self.template_xml(int(args[0]), body), 0]
            if method == "one.templatepool.info":
                return [True, "<VMTEMPLATE_POOL>" + "".join(self.template_xml(t, b) for t, b in
                                                            sorted(self.templates.items())) + "</VMTEMPLATE_POOL>", 0]
            if method == "one.template.instantiate":
                return self.instantiate(int(args[0]), str(args[1]), bool(args[2]), str(args[3] if len(args) > 3 else ""))
            if method in ("one.vmpool.info", "one.vmpool.infoextended"):
                return self.pool(*[int(a) for a in args[:4]], *(args[4:5]), extended=method.endswith("extended"))
            if method == "one.vm.info":
                vm = self.vms.get(int(args[0]))
                if vm is None or not self.listed(vm):
                    return [False, f"[one.vm.info] Error getting virtual machine [{args[0]}].", NO_EXISTS]
                return [True, self.vm_xml(vm), 0]
            if method == "one.vm.action":
                return self.action(str(args[0]), int(args[1]))
            if method == "one.user.info":
                if int(args[0]) not in (-1, self.uid):
                    return [False, f"[one.user.info] Not authorized to perform USE USER [{args[0]}].", AUTH]
                return [True, self.user_xml(), 0]
        return [False, f"[{method}] method not emulated", INTERNAL]


class _Handler(QuickHandler):
    owner: OneServer

    def do_POST(self) -> None:
        srv = self.owner
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        params, method = xmlrpc.client.loads(raw)
        what = f"{method} {params[1]}" if method == "one.vm.action" and len(params) > 1 else method
        call, retry_after = srv.log_call("POST", what, throttled=not srv.overload or method in LEADER_ONLY)
        if retry_after is not None and srv.overload:
            result = [False, f"[{method}] {OVERLOAD[srv.overload]}", INTERNAL]
        elif retry_after is not None:
            call.status = srv.throttle_status
            body = b"Too many requests"
            self.send_response(srv.throttle_status)
            self.send_header("Retry-After", str(max(1, int(retry_after + 0.999))))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        else:
            result = srv.dispatch(method, params)
        if method == "one.template.instantiate" and result[0] and srv.lose_instantiate_responses > 0:
            srv.lose_instantiate_responses -= 1
            call.status = -1
            self.close_connection = True
            return
        call.status = 200 if result[0] else result[2]
        body = xmlrpc.client.dumps((result,), methodresponse=True, allow_none=False).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
