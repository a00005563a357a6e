"""Import a glideinWMS frontend and factory configuration into our YAML.

``python -m airflow_glidein import-gwms --frontend frontend.xml --factory glideinWMS.xml``.
Pure: reads two XML files (and the factory's ``config.d/*.xml``, as
glideinWMS does), returns our configuration as data and a list of notes.

- Each frontend **group** becomes one of our frontends (``<frontend>-<group>``):
  a group has its own match, limits and credentials, as our frontend does.
  Global and group settings are combined the way glideinWMS combines them
  (match_expr, start_expr and query expressions ANDed, credentials and
  schedds added up).
- **match_expr** (Python over ``job[...]`` and ``glidein["attrs"][...]``) is
  translated to ClassAd conjunct by conjunct where the Python is simple
  (comparisons, and/or/not, ``in x.split(",")``, ``in (...)``, ``.get``,
  int/float/str, getGlideinCpusNum); a conjunct that is not is left out
  (the match gets wider, never narrower) and listed for review.
- A group's **entries** are the factory's enabled entries its factory
  query_expr selects (evaluated on the entry's attributes, as on the
  glidefactory ad) where one of its credentials is usable (trust domain
  and auth method, glideinWMS's rule).
- **Limits** are written explicitly with glideinWMS's effective values
  (ramp-up attenuation 3, reserve 5, curbs, relative_to_queue 1.15, ...),
  so the import keeps glideinWMS's behaviour whatever our defaults are.
- **Entries**: gridtype ec2 -> middleware ec2; condor (HTCondor-CE), arc /
  nordugrid and batch -> htcondor_g with the matching grid_resource.
- Secrets are never in either file: credentials get placeholder
  ``conn_id``s to create as Airflow connections.

What cannot be translated is listed as a ``Note`` with its file and line.
"""

from __future__ import annotations

import ast
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.parsers import expat

import classad2

from airflow_glidein import classads
from airflow_glidein.config import NAME

# glideinWMS's defaults (creation/lib/cvWParams.py, creation/lib/factory_defaults.xml)
GROUP_CONFIG = {
    "running_glideins_per_entry": {"max": "10000", "min": "0", "relative_to_queue": "1.15"},
    "idle_glideins_per_entry": {"max": "100", "reserve": "5"},
    "idle_vms_per_entry": {"max": "100", "curb": "5"},
    "idle_vms_total": {"max": "1000", "curb": "200"},
    "running_glideins_total": {"max": "100000", "curb": "90000"},
    "glideins_removal": {"type": "NO"},
    "idle_glideins_lifetime": {"max": "0"},
}
RAMP_UP_ATTENUATION = "3"
JOB_QUERY_EXPR = "(JobUniverse==5)&&(GLIDEIN_Is_Monitor =!= TRUE)&&(JOB_Is_Monitor =!= TRUE)"
CREDENTIAL_TRUST_DOMAIN = "OSG"  # the frontend's default; the factory's entries default to "grid"
ENTRY_DEFAULTS = {"gridtype": "condor", "trust_domain": "grid", "auth_method": "grid_proxy", "enabled": "True"}
MAX_JOBS = {"per_entry": {"glideins": "10000", "idle": "2000", "held": "1000"},
            "default_per_frontend": {"glideins": "5000", "idle": "100", "held": "50"}}
SUBMIT = {"max_per_cycle": "100", "cluster_size": "10"}
LOOP_DELAY = "60"

# glideinWMS credential type -> ours (purpose provision); the others have no equivalent here
CREDENTIAL_TYPES = {"grid_proxy": "x509_proxy", "key_pair": "ec2_key_pair", "scitoken": "scitoken",
                    "idtoken": "idtoken"}
PARAMETERS = ("vm_id", "vm_type")
# frontend attributes that only tune glideinWMS's own machinery
HARMLESS_ATTRS = {"GLIDECLIENT_Rank", "USE_MATCH_AUTH", "GLIDEIN_Expose_Grid_Env"}
ENTRY_FIELDS = ("name", "middleware", "region", "endpoint", "image", "allow_vo_image", "flavor", "cores", "memory_mb",
                "attrs", "requirements", "trust_domain", "auth_method", "limits", "policy", "options")
BOOTSTRAP_PLACEHOLDER = "https://airflow.example.org/glidein"
_ATTR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class GwmsImportError(ValueError):
    """A file that cannot be imported at all (unreadable, not XML, not a glideinWMS configuration)."""


@dataclass(frozen=True)
class Note:
    """Something not translated (``lost``), or translated with a placeholder or an approximation."""

    file: str
    line: int
    what: str
    why: str
    lost: bool = True

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.what}: {self.why}"


# -- XML with line numbers ---------------------------------------------------------------------


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    file: str
    line: int
    children: list[Node] = field(default_factory=list)

    def get(self, name: str, default: str | None = None) -> str | None:
        return self.attrs.get(name, default)

    def child(self, *path: str) -> Node | None:
        node: Node | None = self
        for tag in path:
            node = next((c for c in node.children if c.tag == tag), None) if node else None
        return node

    def all(self, *path: str) -> list[Node]:
        """Every node at ``path`` (the last tag repeated under the others)."""
        parent = self.child(*path[:-1]) if len(path) > 1 else self
        return [c for c in parent.children if c.tag == path[-1]] if parent else []


def parse_xml(path: str | os.PathLike) -> Node:
    """The file's element tree, each node knowing its line (expat; no entity or DTD fetching)."""
    name = os.path.basename(path)
    stack: list[Node] = []
    root: list[Node] = []
    parser = expat.ParserCreate()

    def start(tag: str, attrs: dict[str, str]) -> None:
        node = Node(tag, dict(attrs), name, parser.CurrentLineNumber)
        (stack[-1].children if stack else root).append(node)
        stack.append(node)

    parser.StartElementHandler = start
    parser.EndElementHandler = lambda tag: stack.pop()
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise GwmsImportError(f"{path}: cannot read the file: {exc.strerror}") from None
    try:
        parser.Parse(data, True)
    except expat.ExpatError as exc:
        raise GwmsImportError(f"{path}:{exc.lineno}: not well-formed XML ({expat.ErrorString(exc.code)})") from None
    return root[0]


# -- match_expr: Python -> ClassAd -------------------------------------------------------------


class Untranslatable(Exception):
    pass


_COMPARE = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">="}
_ARITH = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*"}
_CASTS = {"int": "int", "float": "real", "str": "string"}
SCOPES = ("attrs", "params")  # glidein["attrs"] / glidein["params"]: the entry's attributes, ours alike


def translate_match(expr: str) -> tuple[str, list[tuple[str, str]]]:
    """A Python match_expr as ClassAd: (expression, [(conjunct left out, why)]).

    The top-level ``and`` is split; each conjunct is translated on its own,
    and one that cannot be is left out, which widens the match.
    """
    try:
        tree = ast.parse(expr.strip(), mode="eval").body
    except SyntaxError:
        return "true", [(expr.strip(), "not a Python expression")]
    kept, left_out = [], []
    parts = _conjuncts(tree)
    for part in parts:
        source = ast.get_source_segment(expr.strip(), part) or ast.unparse(part)
        try:
            text = _classad(part)
            classads.parse_expr(text)
        except Untranslatable as exc:
            left_out.append((source, str(exc)))
            continue
        except ValueError:
            left_out.append((source, "its translation does not parse as ClassAd"))
            continue
        if text != "true":
            kept.append(text)
    if not kept:
        return "true", left_out
    return (kept[0] if len(kept) == 1 else " && ".join(f"({k})" if " || " in k else k for k in kept)), left_out


def _conjuncts(node: ast.AST) -> list[ast.AST]:
    if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.And):
        return [c for v in node.values for c in _conjuncts(v)]
    return [node]


def _classad(node: ast.AST) -> str:  # noqa: C901 - one case per Python construct
    if isinstance(node, ast.Constant):
        v = node.value
        if isinstance(v, bool):
            return "true" if v else "false"
        if v is None:
            return "undefined"
        if isinstance(v, str):
            return classad2.quote(v)
        if isinstance(v, (int, float)):
            return repr(v)
    attr = _attribute(node)
    if attr:
        return attr
    if isinstance(node, ast.BoolOp):
        op = " && " if isinstance(node.op, ast.And) else " || "
        return "(" + op.join(_classad(v) for v in node.values) + ")"
    if isinstance(node, ast.UnaryOp):
        if isinstance(node.op, ast.Not):
            return f"!({_classad(node.operand)})"
        if isinstance(node.op, ast.USub):
            return f"-{_classad(node.operand)}"
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
        return f"({_classad(node.left)} {_ARITH[type(node.op)]} {_classad(node.right)})"
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        return f"(real({_classad(node.left)}) / {_classad(node.right)})"  # Python 3 divides as reals
    if isinstance(node, ast.IfExp):
        return f"ifThenElse({_classad(node.test)}, {_classad(node.body)}, {_classad(node.orelse)})"
    if isinstance(node, ast.Compare):
        pieces, left = [], node.left
        for op, right in zip(node.ops, node.comparators):
            pieces.append(_compare(left, op, right))
            left = right
        return pieces[0] if len(pieces) == 1 else "(" + " && ".join(pieces) + ")"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
        fn = node.func.id
        if fn in _CASTS and len(node.args) == 1:
            return f"{_CASTS[fn]}({_classad(node.args[0])})"
        if fn == "getGlideinCpusNum" and len(node.args) == 1 and _is_name(node.args[0], "glidein"):
            return "glidein.Cpus"  # the pilot's cores, as matching sees them
    raise Untranslatable(f"{type(node).__name__} `{ast.unparse(node)}` has no simple ClassAd form")


def _compare(left: ast.AST, op: ast.cmpop, right: ast.AST) -> str:
    if type(op) in _COMPARE:
        return f"{_classad(left)} {_COMPARE[type(op)]} {_classad(right)}"
    if isinstance(op, (ast.In, ast.NotIn)):
        text = _member(left, right)
        return f"!{text}" if isinstance(op, ast.NotIn) else text
    raise Untranslatable(f"operator {type(op).__name__} has no ClassAd form")


def _member(item: ast.AST, container: ast.AST) -> str:
    """``x in y.split(",")`` -> stringListMember; ``x in ("a", "b")`` -> a disjunction."""
    if (isinstance(container, ast.Call) and isinstance(container.func, ast.Attribute)
            and container.func.attr == "split" and not container.keywords
            and all(isinstance(a, ast.Constant) and a.value == "," for a in container.args) and container.args):
        return f"stringListMember({_classad(item)}, {_classad(container.func.value)})"
    if isinstance(container, (ast.Tuple, ast.List, ast.Set)) and container.elts:
        x = _classad(item)
        return "(" + " || ".join(f"{x} == {_classad(e)}" for e in container.elts) + ")"
    raise Untranslatable(f"`{ast.unparse(item)} in {ast.unparse(container)}` is a substring or container test "
                         "with no exact ClassAd form (a list of sites reads `in x.split(\",\")`)")


def _is_name(node: ast.AST, name: str) -> bool:
    return isinstance(node, ast.Name) and node.id == name


def _key(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _attribute(node: ast.AST) -> str | None:
    """job["X"], glidein["attrs"]["X"] (or ["params"]) and their .get forms as job.X / glidein.X."""
    if isinstance(node, ast.Subscript):
        base, key = node.value, _key(node.slice)
        if key is None:
            return None
        if _is_name(base, "job"):
            return f"job.{_name(key)}"
        if isinstance(base, ast.Subscript) and _is_name(base.value, "glidein") and _key(base.slice) in SCOPES:
            return f"glidein.{_name(key)}"
        return None
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
            and 1 <= len(node.args) <= 2 and not node.keywords and _key(node.args[0]) is not None):
        owner = node.func.value
        fake = ast.Subscript(value=owner, slice=node.args[0])
        ref = _attribute(fake)
        if ref is None:
            return None
        if len(node.args) == 2:
            return f"ifThenElse(isUndefined({ref}), {_classad(node.args[1])}, {ref})"
        return ref
    return None


def _name(key: str) -> str:
    if not _ATTR_NAME.match(key):
        raise Untranslatable(f"attribute name {key!r} is not a ClassAd attribute name")
    return key


# -- the import --------------------------------------------------------------------------------


@dataclass
class Imported:
    config: dict[str, Any]
    notes: list[Note]
    connections: dict[str, str]  # conn_id -> what to put in it
    sources: list[str]


def import_gwms(frontend_xml: str | os.PathLike, factory_xml: str | os.PathLike) -> Imported:
    """Our configuration from a glideinWMS frontend.xml and factory glideinWMS.xml (+ its config.d)."""
    return _Importer(frontend_xml, factory_xml).run()


def _int(node: Node | None, attr: str, default: str, notes: list[Note]) -> int:
    raw = (node.get(attr) if node is not None else None) or default
    try:
        return int(float(raw))
    except ValueError:
        if node is not None:
            notes.append(Note(node.file, node.line, f"<{node.tag} {attr}>", "not a number; glideinWMS's default "
                              f"{default} used"))
        return int(default)


def _float(node: Node | None, attr: str, default: str, notes: list[Note]) -> float:
    raw = (node.get(attr) if node is not None else None) or default
    try:
        return float(raw)
    except ValueError:
        if node is not None:
            notes.append(Note(node.file, node.line, f"<{node.tag} {attr}>", f"not a number; {default} used"))
        return float(default)


def _bool(value: str | None, default: bool = True) -> bool:
    return default if value is None else value.strip().lower() in ("true", "1", "yes")


def _and(*exprs: str | None) -> str:
    """ANDed expressions, leaving out the trivially true ones."""
    kept = [e.strip() for e in exprs if e and e.strip() and e.strip().lower() not in ("true", "(true)")]
    if not kept:
        return "true"
    return kept[0] if len(kept) == 1 else " && ".join(f"({e})" for e in kept)


def _safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", text).lstrip("_.-") or "x"
    return name[:63]


def _conn_id(text: str) -> str:
    return "glidein_" + re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _cron(seconds: int) -> str:
    minutes = max(1, math.ceil(seconds / 60))
    return "* * * * *" if minutes == 1 else f"*/{minutes} * * * *" if minutes < 60 else "0 * * * *"


class _Importer:
    def __init__(self, frontend_xml: str | os.PathLike, factory_xml: str | os.PathLike) -> None:
        self.fe = parse_xml(frontend_xml)
        if self.fe.tag != "frontend":
            raise GwmsImportError(f"{frontend_xml}: the root element is <{self.fe.tag}>, not a glideinWMS <frontend>")
        fa = parse_xml(factory_xml)
        if fa.tag != "glidein":
            raise GwmsImportError(f"{factory_xml}: the root element is <{fa.tag}>, not a glideinWMS factory <glidein>")
        self.factories = [fa]
        conf_d = Path(factory_xml).parent / "config.d"  # glideinWMS merges these, sorted by name
        if conf_d.is_dir():
            self.factories += [parse_xml(p) for p in sorted(conf_d.glob("*.xml"))]
        self.sources = [str(frontend_xml), str(factory_xml)] + [str(p) for p in sorted(conf_d.glob("*.xml"))]
        self.notes: list[Note] = []
        self.connections: dict[str, str] = {}
        self.mapped: dict[int, dict[str, Any] | None] = {}
        self.fe_name = _safe_name(self.fe.get("frontend_name") or "frontend")

    def note(self, node: Node, what: str, why: str, lost: bool = True) -> None:
        self.notes.append(Note(node.file, node.line, what, why, lost))

    # -- factory ---------------------------------------------------------------------------------

    def entry_nodes(self) -> list[tuple[Node, Node | None]]:
        """(entry, its entry_set or None) in file order; entries of later files override earlier ones."""
        found: dict[str, tuple[Node, Node | None]] = {}
        for fa in self.factories:
            for e in fa.all("entries", "entry"):
                found[e.get("name") or ""] = (e, None)
            for es in fa.all("entry_sets", "entry_set"):
                for e in es.all("entries", "entry"):
                    found[e.get("name") or ""] = (e, es)
            for e in fa.all("entry_sets", "entry"):  # entries written straight under <entry_sets>
                found[e.get("name") or ""] = (e, None)
        return list(found.values())

    def global_attrs(self) -> dict[str, Node]:
        out: dict[str, Node] = {}
        for fa in self.factories:
            for a in fa.all("attrs", "attr"):
                out[a.get("name") or ""] = a
        return out

    def attr_value(self, a: Node) -> Any:
        kind, value = (a.get("type") or "string").lower(), a.get("value") or ""
        if kind == "int":
            try:
                return int(value)
            except ValueError:
                self.note(a, f"attr {a.get('name')}", "type int but not an integer; kept as a string")
                return value
        if kind == "expr":
            if value.strip().lower() in ("true", "false"):
                return value.strip().lower() == "true"
            self.note(a, f"attr {a.get('name')}", "an expression attribute; kept as its text (our entry "
                      "attributes are constants)")
        if "$" in value:
            self.note(a, f"attr {a.get('name')}", "uses $ expansion, which is not done here; kept as written")
        return value

    def entries(self) -> list[dict[str, Any]]:
        out = []
        glob = self.global_attrs()
        for e, entry_set in self.entry_nodes():
            name = e.get("name") or ""
            if not _bool(e.get("enabled", ENTRY_DEFAULTS["enabled"])):
                self.note(e, f"entry {name}", "disabled (enabled=\"False\"): not imported", lost=False)
                continue
            if entry_set is not None:
                self.note(entry_set, f"entry_set {entry_set.get('alias') or entry_set.get('name')}",
                          f"entry {name} imported on its own; the set's selection among its entries is not "
                          "translated")
            entry = self.entry(e, glob)
            if entry is not None:
                out.append(entry)
        return out

    def entry(self, e: Node, glob: dict[str, Node]) -> dict[str, Any] | None:
        name = e.get("name") or ""
        if not re.match(NAME, name):
            safe = _safe_name(name)
            self.note(e, f"entry {name}", f"renamed {safe} (our names: letters, digits, _ . -, 63 at most)", False)
            name = safe
        attr_nodes = {**glob, **{a.get("name") or "": a for a in e.all("attrs", "attr")}}
        attrs = {k: self.attr_value(a) for k, a in attr_nodes.items() if k and _bool(a.get("publish"))}
        gridtype = (e.get("gridtype") or ENTRY_DEFAULTS["gridtype"]).strip()
        gatekeeper = (e.get("gatekeeper") or "").strip()
        auth = e.get("auth_method") or ENTRY_DEFAULTS["auth_method"]
        trust = e.get("trust_domain") or ENTRY_DEFAULTS["trust_domain"]
        entry: dict[str, Any] = {"name": name}
        if self.middleware(e, name, gridtype, gatekeeper, entry) is None:
            return None
        unknown = [t for t in auth.split("+") if t not in CREDENTIAL_TYPES and t not in PARAMETERS]
        if unknown:
            self.note(e, f"entry {name}", f"auth method {'+'.join(unknown)} has no equivalent here: not imported")
            return None
        if entry["middleware"] == "htcondor_g" and "key_pair" in auth.split("+"):
            self.note(e, f"entry {name}", "a batch (BOSCO) entry's key_pair is an SSH key, which the htcondor_g "
                      "middleware does not pass (it submits with a proxy or a token): not imported")
            return None
        entry.update(self.pilot_size(e, name, attr_nodes, attrs))
        entry["attrs"] = attrs
        starts = [k for k in ("GLIDEIN_Start", "GLIDEIN_Entry_Start") if isinstance(attrs.get(k), str)]
        for key in starts:  # the factory's and the entry's parts of the pilots' START: checked when planning here
            start = attrs.pop(key)
            try:
                classads.parse_expr(start)
            except ValueError:
                self.note(attr_nodes[key], f"entry {name} {key}", "does not parse as a ClassAd expression (an "
                          "HTCondor $() macro?): left out of the entry's requirements (wider) - review")
                continue
            if _and(start) != "true":
                entry["requirements"] = _and(entry.get("requirements"), start)
        entry["trust_domain"] = _safe_name(trust)
        entry["auth_method"] = auth
        max_jobs = e.child("config", "max_jobs")
        per_entry = max_jobs.child("per_entry") if max_jobs else None
        submit = e.child("config", "submit")
        notes = self.notes
        entry["limits"] = {
            "max_pilots": _int(per_entry, "glideins", MAX_JOBS["per_entry"]["glideins"], notes),
            "max_idle": _int(per_entry, "idle", MAX_JOBS["per_entry"]["idle"], notes),
            "max_per_cycle": _int(submit, "max_per_cycle", SUBMIT["max_per_cycle"], notes),
            "batch_size": max(1, _int(submit, "cluster_size", SUBMIT["cluster_size"], notes)),
        }
        policy = self.policy(attrs)
        if policy:
            entry["policy"] = policy
        if e.get("rsl"):
            self.note(e, f"entry {name} rsl", "not translated (HTCondor-G submit attributes of the entry are ours)")
        entry["_node"] = e
        entry["_vm"] = {k: e.get(k) for k in PARAMETERS if e.get(k)}
        return entry

    def middleware(self, e: Node, name: str, gridtype: str, gatekeeper: str, entry: dict) -> str | None:
        kind = gridtype.split()[0].lower() if gridtype else ""
        submit_attrs = {a.get("name") or "": a for a in e.all("config", "submit", "submit_attrs", "submit_attr")}
        if kind == "ec2":
            entry["middleware"] = "ec2"
            host = re.sub(r"^[a-z]+://", "", gatekeeper).split("/")[0]
            m = re.match(r"^ec2\.([a-z0-9-]+)\.amazonaws\.com(:\d+)?$", host)
            entry["endpoint"] = host or None
            if m:
                entry["region"] = m.group(1)
            else:
                self.note(e, f"entry {name} gatekeeper", f"not an Amazon EC2 URL: set extra endpoint_url = "
                          f"{gatekeeper} on the entry's aws connection", lost=False)
            entry["options"] = self.ec2_options(name, submit_attrs)
            return "ec2"
        grid = {"condor": "condor", "arc": "arc", "nordugrid": "arc", "batch": "batch"}.get(kind)
        if grid is None:
            self.note(e, f"entry {name}", f"grid type {gridtype!r} has no middleware here (ec2, condor, arc, "
                      "nordugrid, batch are imported): not imported")
            return None
        if not gatekeeper:
            self.note(e, f"entry {name}", "no gatekeeper: not imported")
            return None
        resource = f"{gridtype} {gatekeeper}" if grid == "batch" else f"{grid} {gatekeeper}"
        entry["middleware"] = "htcondor_g"
        entry["options"] = {"grid_resource": resource}
        schedd = e.get("schedd_name") or (self.factories[0].get("schedd_name") or "").split(",")[0].strip()
        if schedd:
            entry["options"]["schedd"] = schedd
        for attr_name, a in submit_attrs.items():
            self.note(a, f"entry {name} submit_attr {attr_name}", "HTCondor-G submit attributes of an entry are "
                      "not passed on")
        return "htcondor_g"

    def ec2_options(self, name: str, submit_attrs: dict[str, Node]) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        simple = {"ec2_keypair": "key_name", "ec2_iam_profile_name": "instance_profile",
                  "ec2_iam_profile_arn": "instance_profile", "ec2_vpc_subnet": "subnet_id"}
        for attr_name, a in submit_attrs.items():
            value = a.get("value") or ""
            if "$" in value:
                self.note(a, f"entry {name} submit_attr {attr_name}", "uses $ expansion: not translated")
            elif attr_name in simple:
                opts[simple[attr_name]] = value
            elif attr_name == "ec2_security_ids":  # HTCondor's group ids (ec2_security_groups: names)
                opts["security_group_ids"] = [v.strip() for v in value.split(",") if v.strip()]
            elif attr_name == "ec2_spot_price":
                opts["spot"] = True
                try:
                    opts["spot_max_price"] = float(value)
                except ValueError:
                    self.note(a, f"entry {name} submit_attr {attr_name}", "not a price; spot at the on-demand price")
            else:
                self.note(a, f"entry {name} submit_attr {attr_name}", "not translated (ours: key_name, subnet_id, "
                          "security_group_ids, instance_profile, spot)")
        return opts

    def pilot_size(self, e: Node, name: str, nodes: dict[str, Node], attrs: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for attr_name, key in (("GLIDEIN_CPUS", "cores"), ("GLIDEIN_MaxMemMBs", "memory_mb")):
            if attr_name not in attrs:
                self.note(e, f"entry {name} {key}", f"no {attr_name}: planning assumes our default pilot size "
                          "(1 core, 2048 MB) and packs jobs by it - set the entry's real size", lost=False)
                continue
            try:
                value = int(str(attrs[attr_name]).strip())
                if value <= 0:
                    raise ValueError
                out[key] = value
            except ValueError:
                self.note(nodes[attr_name], f"entry {name} {attr_name}", f"{attrs[attr_name]!r} is decided on the "
                          f"worker node; ours plans with a fixed size: {key} left at our default", lost=False)
        return out

    def policy(self, attrs: dict[str, Any]) -> dict[str, int]:
        """The pilot's lifetime from GLIDEIN_Retire_Time / GLIDEIN_Max_Walltime, idle timeout from GLIDEIN_Max_Idle."""
        def num(key: str) -> int | None:
            try:
                return int(attrs[key]) if key in attrs else None
            except (TypeError, ValueError):
                return None

        out: dict[str, int] = {}
        walltime, retire, idle = num("GLIDEIN_Max_Walltime"), num("GLIDEIN_Retire_Time"), num("GLIDEIN_Max_Idle")
        if retire and walltime and walltime >= retire:
            out.update(max_lifetime=retire, retire_window=walltime - retire)
        elif walltime:  # retire an hour (a quarter of a short walltime) before the VM must be gone
            window = min(3600, walltime // 4)
            out.update(max_lifetime=walltime - window, retire_window=window)
        elif retire:
            out["max_lifetime"] = retire
        if idle:
            out["idle_timeout"] = idle
        return out

    # -- frontend --------------------------------------------------------------------------------

    def run(self) -> Imported:
        fe = self.fe
        entries = self.entries()
        pool = next((c.get("node") for c in fe.all("collectors", "collector")
                     if c.get("node") and not _bool(c.get("secondary"), False)), None)
        if not pool:
            self.note(fe, "collectors", "no pool collector: registration is not observed and demand needs schedds")
        factory = self.factory(pool)
        credentials: dict[str, dict] = {}
        frontends = []
        groups = fe.all("groups", "group")
        for g in groups:
            out = self.group(g, entries, credentials, pool, many=len(groups) > 1)
            if out:
                frontends.append(out)
        self.unpassed(fe)
        used = {n for f in frontends for n in f["entries"]}
        for e in entries:
            if e["name"] not in used:
                self.note(e["_node"], f"entry {e['name']}", "no group selects it (factory query_expr, trust domain "
                          "or auth method): imported but unused", lost=False)
        clean = [{k: e[k] for k in ENTRY_FIELDS if k in e} for e in entries]
        config = {"factory": factory, "entries": clean, "frontends": frontends,
                  "credentials": list(credentials.values())}
        return Imported(config, list(dict.fromkeys(self.notes)), self.connections, self.sources)

    def factory(self, pool: str | None) -> dict[str, Any]:
        fa, fe = self.factories[0], self.fe
        cfg = fe.child("config")
        notes = self.notes
        totals = {k: cfg.child(k) if cfg else None for k in ("running_glideins_total", "running_glideins_total_global",
                                                             "idle_vms_total", "idle_vms_total_global")}
        self.note(fa, "factory.bootstrap_url", f"set to your Airflow API server's URL + /glidein (written: "
                  f"{BOOTSTRAP_PLACEHOLDER})", lost=False)
        return {
            "name": _safe_name(fa.get("factory_name") or fa.get("glidein_name") or f"{self.fe_name}-factory"),
            "bootstrap_url": BOOTSTRAP_PLACEHOLDER,
            "schedule": _cron(_int(fa, "loop_delay", LOOP_DELAY, notes)),
            "collector": pool,
            # the frontend's totals over all its groups (and the pool's, *_global): our factory's totals
            "limits": {
                "max_pilots": min(_int(totals["running_glideins_total"], "max", "100000", notes),
                                  _int(totals["running_glideins_total_global"], "max", "100000", notes)),
                "max_idle": min(_int(totals["idle_vms_total"], "max", "1000", notes),
                                _int(totals["idle_vms_total_global"], "max", "1000", notes)),
            },
        }

    def group(self, g: Node, entries: list[dict], credentials: dict[str, dict], pool: str | None,
              many: bool) -> dict[str, Any] | None:
        fe, fe_name, gname = self.fe, self.fe_name, g.get("name") or "group"
        name = _safe_name(f"{fe_name}-{gname}")
        if not _bool(g.get("enabled")):
            self.note(g, f"group {gname}", "disabled (enabled=\"False\"): not imported", lost=False)
            return None
        gm, fm = g.child("match"), fe.child("match")
        for m in (fm, gm):
            if m is not None and m.get("policy_file"):
                self.note(m, f"group {gname} policy_file", "a Python match policy module: not translated")
        match_py = " and ".join(f"({(m.get('match_expr') if m else None) or 'True'})" for m in (fm, gm))
        match, left_out = translate_match(match_py)
        for source, why in left_out:
            where = gm if gm is not None and gm.get("match_expr") and source in gm.get("match_expr", "") else fm or g
            self.note(where, f"group {gname} match_expr `{source}`", f"{why}; left out of the match (wider) - review")
        start = self.start_expr(gname, fm, gm, g)
        constraint = _and((fm.child("job").get("query_expr") if fm and fm.child("job") else None) or JOB_QUERY_EXPR,
                          gm.child("job").get("query_expr") if gm and gm.child("job") else None)
        try:
            classads.parse_expr(constraint)
        except ValueError:
            self.note((gm or g), f"group {gname} job query_expr", "does not parse as ClassAd: every job is read")
            constraint = "true"
        schedds = [s.get("fullname") for m in (fm, gm) if m is not None for s in m.all("job", "schedds", "schedd")
                   if s.get("fullname")]
        creds = self.group_credentials(g)
        chosen = self.select_entries(gname, g, fm, gm, entries, creds)
        if not chosen:
            self.note(g, f"group {gname}", "no factory entry is usable by it: not imported")
            return None
        used_creds = sorted({c["id"] for e in chosen for c in creds if self.usable(c, e)})
        for c in creds:
            if c["id"] not in used_creds:
                self.note(c["_node"], f"credential {c['id']}", f"usable on none of group {gname}'s entries: unused",
                          lost=False)
        domains = sorted({e["trust_domain"] for e in chosen})
        pilot_ids = []
        for td in domains:
            pid, conn = _safe_name(f"{fe_name}-pool-token-{td}"), _conn_id(f"{fe_name}-pool-token")
            credentials.setdefault(pid, {"id": pid, "type": "idtoken", "conn_id": conn, "trust_domain": td,
                                         "purpose": "pilot"})
            self.connections.setdefault(conn, "glidein_token: the pool's IDTOKEN for pilots (glideinWMS's frontend "
                                              "signed one per pilot; here it comes from this connection)")
            pilot_ids.append(pid)
        for c in creds:
            if c["id"] in used_creds:
                credentials.setdefault(c["id"], {k: v for k, v in c.items() if not k.startswith("_")})
        vo_images = sorted({c["_vm"]["vm_id"] for c in creds if c["id"] in used_creds and "vm_id" in c["_vm"]})
        out: dict[str, Any] = {
            "name": name,
            "schedule": _cron(_int(fe, "loop_delay", LOOP_DELAY, self.notes)),
            "demand": {k: v for k, v in (("collector", pool), ("schedds", schedds), ("constraint", constraint)) if v},
            "match_expr": match,
            "start_expr": start,
            "entries": [e["name"] for e in chosen],
            "credentials": used_creds + pilot_ids,
        }
        if not pool and not schedds:
            out["demand"] = {"queue_file": "queue.json", "constraint": constraint}
            self.note(g, f"group {gname} demand", "no pool collector and no schedds: reads queue.json - set the "
                      "collector or schedds", lost=False)
        if vo_images:
            out["vo_image"] = vo_images[0]
        out["limits"] = self.limits(gname, g, chosen, many)
        self.unpassed(g)
        return out

    def unpassed(self, node: Node) -> None:
        """Attributes for pilots and custom scripts of the frontend or a group: nothing here carries them."""
        for a in node.all("attrs", "attr"):
            if a.get("name") not in HARMLESS_ATTRS | {"GLIDECLIENT_Start", "GLIDECLIENT_Group_Start"}:
                self.note(a, f"attr {a.get('name')}", "frontend attributes are not passed to pilots here (an "
                          "entry's attrs are what a pilot advertises)")
        for f in node.all("files", "file"):
            self.note(f, f"file {f.get('absfname')}", "custom pilot scripts are not run by our pilots")

    def start_expr(self, gname: str, fm: Node | None, gm: Node | None, g: Node) -> str:
        """glideinWMS's START: global and group start_expr, and GLIDECLIENT_(Group_)Start attributes, ANDed."""
        parts = [m.get("start_expr") for m in (fm, gm) if m is not None]
        for a in self.fe.all("attrs", "attr") + g.all("attrs", "attr"):
            if a.get("name") in ("GLIDECLIENT_Start", "GLIDECLIENT_Group_Start"):
                parts.append(a.get("value"))
        start = _and(*parts)
        try:
            classads.parse_expr(start)
        except ValueError:
            self.note(gm or g, f"group {gname} start_expr", "does not parse as ClassAd (a $ expansion?): "
                      "pilots START with true - review")
            return "true"
        return start

    def group_credentials(self, g: Node) -> list[dict[str, Any]]:
        """The group's credentials then the frontend's (glideinWMS's order), mapped to ours."""
        nodes = g.all("security", "credentials", "credential") + self.fe.all("security", "credentials", "credential")
        return [c for c in map(self.credential, nodes) if c]

    def credential(self, c: Node) -> dict[str, Any] | None:
        """One credential as ours (mapped, and its notes written, once however many groups use it)."""
        if id(c) in self.mapped:
            return self.mapped[id(c)]
        tokens = (c.get("type") or "grid_proxy").split("+")
        base = [t for t in tokens if t not in PARAMETERS]
        label = c.get("name") or os.path.basename(c.get("absfname") or c.get("generator") or "credential")
        out = None
        if len(base) != 1 or base[0] not in CREDENTIAL_TYPES:
            self.note(c, f"credential {label}", f"type {c.get('type')} has no equivalent here (ours: grid_proxy, "
                      "key_pair, scitoken, idtoken): not imported")
        else:
            if c.get("generator") or c.get("creation_script") or c.get("pool_idx_list"):
                self.note(c, f"credential {label}", "generated or pooled: one connection stands for it", lost=False)
            for k in PARAMETERS:
                if c.get(f"{k}_fname"):
                    self.note(c, f"credential {label} {k}_fname", f"read {k} from the file and set it in the "
                              "configuration", lost=False)
            ours, cid = CREDENTIAL_TYPES[base[0]], _safe_name(f"{self.fe_name}-{label}")
            out = {"id": cid, "type": ours, "conn_id": _conn_id(cid),
                   "trust_domain": _safe_name(c.get("trust_domain") or CREDENTIAL_TRUST_DOMAIN),
                   "purpose": "provision", "_node": c, "_vm": {k: c.get(k) for k in PARAMETERS if c.get(k)},
                   "_tokens": set(tokens)}
            where = f"now in {c.get('absfname')}"
            self.connections[out["conn_id"]] = {
                "x509_proxy": f"glidein_x509: the proxy {where}",
                "ec2_key_pair": f"aws: access key id ({where}) and secret key (now in {c.get('keyabsfname')})",
            }.get(ours, f"glidein_token: the token {where}")
        self.mapped[id(c)] = out
        return out

    @staticmethod
    def usable(cred: dict[str, Any], entry: dict[str, Any]) -> bool:
        """glideinWMS's rule: same trust domain, the entry's auth methods all among the credential's
        (vm_id / vm_type from the credential or, as a fixed value, the entry)."""
        if cred["trust_domain"] != entry["trust_domain"]:
            return False
        have = cred["_tokens"] | {k for k in PARAMETERS if k in entry["_vm"]}
        return set(entry["auth_method"].split("+")) <= have

    def select_entries(self, gname: str, g: Node, fm: Node | None, gm: Node | None, entries: list[dict],
                       creds: list[dict]) -> list[dict]:
        query = _and(*[m.child("factory").get("query_expr") for m in (fm, gm)
                       if m is not None and m.child("factory") is not None])
        try:
            classads.parse_expr(query)
        except ValueError:
            self.note(gm or g, f"group {gname} factory query_expr", "does not parse as ClassAd: every entry is "
                      "considered - review")
            query = "true"
        chosen = []
        for e in entries:
            ad = classads.to_ad({**e["attrs"], "EntryName": e["name"], "GLIDEIN_GridType": e["_node"].get(
                "gridtype") or ENTRY_DEFAULTS["gridtype"], "GLIDEIN_Gatekeeper": e["_node"].get("gatekeeper"),
                "GLIDEIN_TrustDomain": e["trust_domain"], "GLIDEIN_SupportedAuthenticationMethod": e["auth_method"]})
            ad["__query"] = classad2.ExprTree(query)
            if not classads.is_true(ad.eval("__query")):
                continue
            if not any(self.usable(c, e) for c in creds):
                domains = ", ".join(sorted({c["trust_domain"] for c in creds})) or "none"
                self.note(e["_node"], f"entry {e['name']}", f"selected by group {gname}, but none of its credentials "
                          f"(trust domains: {domains}) is of trust domain {e['trust_domain']!r} with auth method "
                          f"{e['auth_method']!r}: left out of the group (glideinWMS would skip it too)", lost=False)
                continue
            self.entry_image(e, [c for c in creds if self.usable(c, e)])
            chosen.append(e)
        return chosen

    def entry_image(self, e: dict[str, Any], creds: list[dict]) -> None:
        """An EC2 entry's image and flavor: the entry's vm_id / vm_type, else the credential's (VO-provided)."""
        if e["middleware"] != "ec2" or ("image" in e and "flavor" in e):
            return
        node, tokens = e["_node"], set(e["auth_method"].split("+"))
        for key, field_name in (("vm_id", "image"), ("vm_type", "flavor")):
            if field_name in e:
                continue
            if key in e["_vm"]:
                e[field_name] = e["_vm"][key]
                continue
            offered = sorted({c["_vm"][key] for c in creds if key in c["_vm"]})
            if offered:
                e[field_name] = offered[0]
                if key == "vm_id" and "vm_id" in tokens:
                    e["allow_vo_image"] = True  # the frontend brings its image here, as in glideinWMS
                if len(offered) > 1:
                    self.note(node, f"entry {e['name']} {field_name}", f"credentials offer {len(offered)} {key}s; "
                              f"{offered[0]} written", lost=False)
            else:
                e[field_name] = "CHANGEME"
                self.note(node, f"entry {e['name']} {field_name}", f"no {key} in the entry or its credentials: "
                          "set it", lost=False)

    def limits(self, gname: str, g: Node, chosen: list[dict], many: bool) -> dict[str, Any]:
        cfg, fe_cfg, notes = g.child("config"), self.fe.child("config"), self.notes

        def val(section: str, key: str, node: Node | None = None) -> int:
            return _int(node.child(section) if node else None, key, GROUP_CONFIG[section][key], notes)

        def fval(section: str, key: str) -> float:
            return _float(cfg.child(section) if cfg else None, key, GROUP_CONFIG[section][key], notes)

        per_fe_glideins, per_fe_idle = self.factory_per_frontend(gname, chosen)
        limits = {
            "max_running": val("running_glideins_total", "max", cfg),
            "max_idle": val("idle_vms_total", "max", cfg),
            "max_running_per_entry": min(val("running_glideins_per_entry", "max", cfg), per_fe_glideins),
            "max_idle_per_entry": min(val("idle_glideins_per_entry", "max", cfg), val("idle_vms_per_entry", "max", cfg),
                                      per_fe_idle),
            "curb_idle_per_entry": val("idle_vms_per_entry", "curb", cfg),
            "curb_idle": val("idle_vms_total", "curb", cfg),
            "curb_running": val("running_glideins_total", "curb", cfg),
            "reserve_idle": val("idle_glideins_per_entry", "reserve", cfg),
            "ramp_up_attenuation": max(1.0, _float(cfg, "ramp_up_attenuation", RAMP_UP_ATTENUATION, notes)),
            "fraction_running": max(1.0, fval("running_glideins_per_entry", "relative_to_queue")),
        }
        for key, ours in (("running_glideins_total", "curb_running"), ("idle_vms_total", "curb_idle")):
            fe_curb = val(key, "curb", fe_cfg)
            if fe_curb < limits[ours]:
                limits[ours] = fe_curb
                if many:
                    self.note(fe_cfg or self.fe, f"<config><{key} curb>", f"a curb over all groups; each group's "
                              f"{ours} is set to it (reached per group, later than glideinWMS would)", lost=False)
        checks = (
            ("running_glideins_per_entry", "min", "0", "a minimum of running pilots per entry is not kept here"),
            ("glideins_removal", "type", "NO", "removal requests: ours retire idle pilots by idle_timeout instead"),
            ("idle_glideins_lifetime", "max", "0", "idle pilots' queue lifetime: ours is the entry's boot_timeout"),
        )
        for section, key, default, why in checks:
            node = cfg.child(section) if cfg else None
            if node is not None and (node.get(key) or default).upper() != default:
                self.note(node, f"group {gname} <{section} {key}>", why)
        return limits

    def factory_per_frontend(self, gname: str, chosen: list[dict]) -> tuple[int, int]:
        """The factory's per-frontend caps at the group's entries (max_jobs), folded into the frontend's
        per-entry limits: exact when every entry has the same, the smallest otherwise."""
        names = {self.fe.get("frontend_name"), self.fe.child("security").get("security_name")
                 if self.fe.child("security") else None} - {None}
        caps = []
        for e in chosen:
            mj = e["_node"].child("config", "max_jobs")
            limit = mj.child("default_per_frontend") if mj else None
            for pf in (mj.all("per_frontends", "per_frontend") if mj else []):
                if (pf.get("name") or "").split(":")[0] in names:
                    limit = pf
            caps.append((_int(limit, "glideins", MAX_JOBS["default_per_frontend"]["glideins"], self.notes),
                         _int(limit, "idle", MAX_JOBS["default_per_frontend"]["idle"], self.notes)))
        glideins, idle = min(c[0] for c in caps), min(c[1] for c in caps)
        if len(set(caps)) > 1:
            self.note(chosen[0]["_node"], f"group {gname} per-frontend max_jobs",
                      f"the entries' per-frontend limits differ; the smallest ({glideins} pilots, {idle} idle) "
                      "is every entry's here", lost=False)
        return glideins, idle


# -- output ------------------------------------------------------------------------------------


def to_yaml(result: Imported) -> str:
    """The configuration as YAML, headed by what to fill in and what was not translated."""
    import yaml

    lines = ["airflow-glidein configuration imported from glideinWMS (python -m airflow_glidein import-gwms)",
             "from: " + ", ".join(result.sources)]
    if result.connections:
        lines.append("Airflow connections to create (secrets never go in this file):")
        lines += [f"  {conn}: {what}" for conn, what in sorted(result.connections.items())]
    for title, lost in (("To check", False), ("Not translated", True)):
        notes = [n for n in result.notes if n.lost == lost]
        if notes:
            lines.append(f"{title} ({len(notes)}):")
            lines += [f"  {n}" for n in notes]
    head = "".join("# " + " ".join(line.split("\n")) + "\n" for line in lines)  # a newline would end the comment
    return head + yaml.safe_dump(result.config, sort_keys=False, width=120, default_flow_style=None)
