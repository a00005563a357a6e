"""The configuration file: factory, entries, frontends and credentials.

One YAML file, loaded into typed models. A bad file is rejected with a
message naming the file, the field path and the problem; values are never
echoed back, so a secret pasted into the wrong field is not printed.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse
from typing import Annotated, Any, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from airflow_glidein import classads, middlewares

# Middlewares and credential types (with the glideinWMS auth methods each satisfies) are described in
# airflow_glidein.middlewares. Parameters, not secrets (glideinWMS: key_pair+vm_id+vm_type):
AUTH_PARAMETERS = {"vm_id", "vm_type"}

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
Name = Annotated[str, Field(pattern=NAME)]
# Bounds no real site reaches, far inside what ClassAds, SQL and the planner's arithmetic hold.
MAX_CORES = 1024  # per pilot
MAX_GPUS = 256  # per pilot
MAX_MEMORY_MB = 16 * 1024 * 1024  # 16 TiB per pilot
MAX_COUNT = 10_000_000  # pilots, limits, batch sizes, API requests, retries
MAX_SECONDS = 10 * 365 * 86400  # timeouts, lifetimes, windows: 10 years
MAX_PRICE = 1_000_000.0  # per core-hour
MAX_FACTOR = 1000.0  # ramp_up_attenuation, fraction_running
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
PosCount = Annotated[int, Field(gt=0, le=MAX_COUNT)]
Seconds = Annotated[int, Field(ge=0, le=MAX_SECONDS)]
PosSeconds = Annotated[int, Field(gt=0, le=MAX_SECONDS)]
# A field without a narrower bound (none here) still stays well inside a 64-bit integer.
NonNeg = Seconds
Pos = PosSeconds
Factor = Annotated[float, Field(ge=1.0, le=MAX_FACTOR, allow_inf_nan=False)]


class ConfigError(Exception):
    """A configuration file that cannot be used; str() lists every problem."""

    def __init__(self, path: str | os.PathLike, problems: list[str]):
        self.path = str(path)
        self.problems = problems
        super().__init__("\n".join(f"{self.path}: {p}" for p in problems))


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_classad(value: str) -> str:
    classads.parse_expr(value)  # raises ValueError with the parser's reason
    return value


ClassAdExpr = Annotated[str, AfterValidator(_check_classad)]


class EntryLimits(Model):
    """Entry-wide limits; they hold across all frontends using the entry."""

    max_pilots: Count = 100  # pilots in any live state at this entry
    max_idle: Count = 20  # pilots booting or registered idle
    max_per_cycle: Count = 20  # launches per factory cycle
    batch_size: PosCount = 10  # instances per provider call (one launch id each)


class PilotPolicy(Model):
    boot_timeout: PosSeconds = 900  # s from start (a VM's launch, a grid job's start at the site) to registration
    # s a pilot may wait queued before the site starts it (a grid job at a CE); VMs do not queue
    queue_timeout: PosSeconds = 86400
    idle_timeout: PosSeconds = 1200  # s a registered pilot may stay unclaimed
    max_lifetime: PosSeconds = 86400  # s from start until the pilot is retired
    retire_window: Seconds = 3600  # s a retiring busy pilot may finish its jobs
    min_idle_lifetime: Seconds = 1800  # s of life a pilot needs left to count as capacity (glideinWMS #554)
    terminate_deadline: PosSeconds = 300  # s a provider gets to make a terminating VM disappear before we ask again


class PolicyOverride(Model):
    boot_timeout: PosSeconds | None = None
    queue_timeout: PosSeconds | None = None
    idle_timeout: PosSeconds | None = None
    max_lifetime: PosSeconds | None = None
    retire_window: Seconds | None = None
    min_idle_lifetime: Seconds | None = None  # a VO of long jobs raises it
    terminate_deadline: PosSeconds | None = None


class ApiBudget(Model):
    """Provider calls allowed per window, shared by every worker (token bucket)."""

    requests: PosCount = 500
    per_seconds: PosSeconds = 300
    concurrency: PosCount = 4  # slots of the endpoint's Airflow pool: factory tasks calling it at once


class UserDataEncryption(Model):
    """Seal the entry's UserData envelope for its image's X25519 key (README "On the VM").

    Name the image's *public* key, inline or in an Airflow connection; the
    private key lives only in the image.
    """

    public_key: str | None = None  # PEM, or base64 of its DER (`openssl pkey -pubout -outform DER | base64`)
    conn_id: str | None = None  # or: a connection whose password (or extra "public_key") holds it

    @model_validator(mode="after")
    def _one_key(self) -> UserDataEncryption:
        if bool(self.public_key) == bool(self.conn_id):
            raise ValueError("name the image's public key either inline (public_key) or by conn_id, not both")
        if self.public_key:
            from airflow_glidein.userdata import EnvelopeError, image_public_from_text

            try:
                image_public_from_text(self.public_key)
            except EnvelopeError as exc:
                raise ValueError(str(exc)) from None
        return self


class Entry(Model):
    name: Name
    middleware: str  # one of airflow_glidein.middlewares (built in, or installed)
    region: str | None = None
    endpoint: str | None = None  # names the API endpoint (budget, pool); the URL itself is in the connection
    image: str | None = None
    allow_vo_image: bool = False
    flavor: str | None = None  # EC2 instance type, Nova flavor, OpenNebula template
    cores: Annotated[int, Field(gt=0, le=MAX_CORES)] = 1
    memory_mb: Annotated[int, Field(gt=0, le=MAX_MEMORY_MB)] = 2048
    gpus: Annotated[int, Field(ge=0, le=MAX_GPUS)] = 0
    # cost of one core-hour (any one currency): with prices, a job matching several entries goes to the
    # cheaper and emptier first (HEPCloud's figure of merit); without, it counts equally (glideinWMS)
    price: Annotated[float, Field(ge=0, le=MAX_PRICE, allow_inf_nan=False)] | None = None
    attrs: dict[str, str | int | float | bool] = {}
    requirements: ClassAdExpr | None = None  # over the job (TARGET), with the entry's ad as MY
    trust_domain: Name
    auth_method: str = "key_pair"
    limits: EntryLimits = EntryLimits()
    policy: PilotPolicy = PilotPolicy()
    api_budget: ApiBudget = ApiBudget()
    # s a created instance may be missing from the provider's listing (listings lag: EC2's
    # DescribeInstances is eventually consistent, private clouds more so); until then its recorded id
    # counts as capacity, and a create call whose answer was lost is not repeated
    listing_grace: Seconds = 300
    options: dict[str, Any] = {}  # middleware-specific settings (subnet, network, key name, ...), its schema
    encrypt_userdata: UserDataEncryption | None = None  # seal the envelope for the image's key

    @field_validator("middleware")
    @classmethod
    def _known_middleware(cls, v: str) -> str:
        middlewares.get(v)  # raises with the known ones
        return v

    @field_validator("options")
    @classmethod
    def _middleware_options(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "middleware" not in info.data:
            return v  # the middleware is already reported
        # pydantic reports the schema's errors under this field (entries[x].options.subnt_id: unknown field);
        # the hooks read the options with the schema's defaults filled in
        schema = middlewares.get(info.data["middleware"]).options
        return schema.model_validate(v).model_dump(exclude_none=True)

    @field_validator("auth_method")
    @classmethod
    def _known_auth(cls, v: str) -> str:
        known = middlewares.auth_methods(installed=False) | AUTH_PARAMETERS
        parts = v.split("+")
        if not set(parts) <= known:  # perhaps a method of a credential type an installed middleware brings
            known |= middlewares.auth_methods()
        bad = [str(i) for i, t in enumerate(parts, 1) if t not in known]
        if bad:  # never echoed: a secret pasted here must not reach a log
            what = f"part {bad[0]} of {len(parts)} is not a known auth method" if len(bad) == 1 else \
                f"parts {', '.join(bad)} of {len(parts)} are not known auth methods"
            raise ValueError(f"{what} (parts are joined by '+'); known: {', '.join(sorted(known))}")
        return v

    @field_validator("attrs")
    @classmethod
    def _classad_values(cls, attrs: dict[str, Any]) -> dict[str, Any]:
        for i, (key, value) in enumerate(attrs.items(), 1):
            if isinstance(value, bool):
                continue
            if isinstance(value, int) and not -(2**63) <= value < 2**63 or isinstance(value, float) \
                    and not math.isfinite(value):
                raise ValueError(f"attribute {_shown(key, i)} is a number no ClassAd holds "
                                 "(a 64-bit integer, or a finite real)")
        return attrs

    @model_validator(mode="after")
    def _known_region(self) -> Entry:
        if self.middleware == "ec2" and self.region and not self.endpoint:
            known = aws_regions()
            if known and self.region not in known:
                raise ValueError("region is not an AWS region botocore knows for EC2 (for an EC2-compatible "
                                 "cloud, name its endpoint; for a region newer than botocore, upgrade it)")
        return self

    @model_validator(mode="after")
    def _launch_key_is_the_marker(self) -> Entry:
        if self.middleware == "ec2" and self.options.get("key_name") and self.options.get("marker") != "security_group":
            from airflow_glidein import ec2_profiles

            profile = ec2_profiles.resolve(self.options, self.endpoint)
            if profile.key_marker:
                raise ValueError(f"options.key_name cannot be set with profile {profile.name}: each launch gets "
                                 "its own key pair there, the marker that finds its instances (pilots need no "
                                 "SSH key; or set options.marker: security_group)")
        return self

    @model_validator(mode="after")
    def _cloud_needs_image(self) -> Entry:
        if middlewares.get(self.middleware).vm:
            if not self.image:
                raise ValueError(f"a {self.middleware} entry needs an image")
            if not self.flavor:
                raise ValueError(f"a {self.middleware} entry needs a flavor (instance type)")
        elif self.encrypt_userdata:
            raise ValueError("encrypt_userdata needs a VM image holding the private key; "
                             f"{self.middleware} pilots run on worker nodes we do not build")
        return self

    @property
    def auth_tokens(self) -> set[str]:
        return set(self.auth_method.split("+")) - AUTH_PARAMETERS

    @property
    def api_endpoint(self) -> str:
        """What an API budget and an Airflow pool are keyed by."""
        return self.endpoint or f"{self.middleware}-{self.region or 'default'}"

    def machine_attrs(self) -> dict[str, Any]:
        """The ClassAd a pilot of this entry will advertise, as matching sees it."""
        ad = {"Cpus": self.cores, "Memory": self.memory_mb, "GPUs": self.gpus, "GLIDEIN_Entry_Name": self.name}
        ad.update(self.attrs)
        return ad


class DemandSource(Model):
    """Where a frontend reads its demand: schedds through htcondor2, or a file."""

    collector: str | None = None
    schedds: list[str] = []  # empty with a collector: every schedd it knows
    queue_file: str | None = None  # condor_q -json or condor_q -autocluster -json
    constraint: ClassAdExpr = "true"
    timeout: PosSeconds = 30

    @model_validator(mode="after")
    def _one_source(self) -> DemandSource:
        if not self.queue_file and not self.collector and not self.schedds:
            raise ValueError("name a collector, schedds, or a queue_file")
        return self


class FrontendLimits(Model):
    max_running: Count = 10000  # this frontend's pilots in all entries
    max_idle: Count = 100  # this frontend's booting + idle pilots in all entries
    max_running_per_entry: Count = 10000
    max_idle_per_entry: Count = 100
    # glideinWMS's curbs: each one reached halves what is added this cycle.
    curb_idle_per_entry: Count = 5  # booting + idle pilots at one entry
    curb_idle: Count = 20  # booting + idle pilots in all entries
    curb_running: Count = 9000  # pilots in all entries
    reserve_idle: Count = 5  # extra pilots for jobs idle 10 min or more (glideinWMS reserve)
    # glideinWMS divides new requests by 3; our factory subtracts in-flight launches exactly, so 1 by default.
    ramp_up_attenuation: Factor = 1.0
    fraction_running: Factor = 1.15  # max running = (wanted + busy) x this + 1


class DemandWatch(Model):
    """Event-driven runs: the triggerer watches the demand and starts the frontend when it appears."""

    threshold: PosCount = 1  # matching idle jobs that start a run
    poll: PosSeconds = 30  # s between demand queries (each asks every schedd)
    min_interval: Seconds = 60  # s at least between two runs it starts


class Frontend(Model):
    name: Name
    schedule: str | None = "*/5 * * * *"
    watch: DemandWatch | None = None  # besides the schedule, run as soon as idle demand appears
    demand: DemandSource
    match_expr: ClassAdExpr = "true"  # over job.* and glidein.*
    start_expr: ClassAdExpr = "true"  # becomes the pilots' START expression
    entries: list[Name] = Field(min_length=1)
    credentials: list[Name] = Field(min_length=1)
    vo_image: str | None = None
    limits: FrontendLimits = FrontendLimits()
    policy: PolicyOverride = PolicyOverride()
    request_ttl: PosSeconds = 1800  # s after which the factory ignores this frontend's last request


class Credential(Model):
    id: Name
    type: str  # a credential type of airflow_glidein.middlewares
    conn_id: str = Field(min_length=1)
    trust_domain: Name
    purpose: Literal["provision", "pilot"]
    # s of lifetime the credential must have left to be chosen; None: the pilot's max_lifetime
    # (the factory lists and terminates, and the pilot authenticates, until the pilot retires)
    min_lifetime: Seconds | None = None

    @field_validator("type")
    @classmethod
    def _known_type(cls, v: str) -> str:
        middlewares.credential_type(v)  # raises with the known ones
        return v

    @model_validator(mode="after")
    def _pilot_kind(self) -> Credential:
        if self.purpose == "pilot" and not middlewares.credential_type(self.type).pilot:
            raise ValueError(f"a {self.type} cannot join a pool; a pilot credential is one of "
                             f"{', '.join(middlewares.pilot_credential_types())}")
        return self

    @property
    def auth_methods(self) -> set[str]:
        return set(middlewares.credential_type(self.type).auth_methods)


class GlobalLimits(Model):
    """Totals across all frontends and entries of this factory."""

    max_pilots: Count = 100000
    max_idle: Count = 1000


class CondorTarball(Model):
    """An HTCondor release the bootstrap service hands to pilots on worker nodes without HTCondor (grid sites),
    as glideinWMS's factory serves its condor tarballs. The envelope carries its SHA-256; the pilot checks it."""

    path: str = Field(min_length=1)  # the tarball on the bootstrap service's machine (condor-*-stripped.tar.gz)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # the service refuses to serve a file that does not match


class Factory(Model):
    name: Name
    bootstrap_url: str = Field(pattern=r"^https?://")
    schedule: str | None = "*/5 * * * *"
    collector: str | None = None  # where pilots register; None: registration is not observed
    limits: GlobalLimits = GlobalLimits()
    retries: Count = 3  # Airflow task retries of the glidein DAGs
    retry_delay: Seconds = 20  # s between them
    verify_timeout: PosSeconds = 120  # s the factory waits for terminated pilots to disappear
    verify_poll: PosSeconds = 15  # s between those checks (each lists the entry: API budget)
    insecure_http: bool = False  # allow a plain-http bootstrap_url off loopback (the exchange hands out credentials)
    condor_tarballs: dict[Name, CondorTarball] = {}  # by name; grid entries pick one (options.condor_tarball)

    @model_validator(mode="after")
    def _tls(self) -> Factory:
        url = urlparse(self.bootstrap_url)
        if url.scheme == "http" and not self.insecure_http and not _loopback(url.hostname or ""):
            raise ValueError("bootstrap_url: plain http off this machine sends the pool credential in the clear; "
                             "use https (serve-bootstrap --tls-cert/--tls-key, or a TLS proxy), or set "
                             "insecure_http: true")
        return self


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Config(Model):
    factory: Factory
    entries: list[Entry] = Field(min_length=1)
    frontends: list[Frontend] = []
    credentials: list[Credential] = []

    @model_validator(mode="after")
    def _references(self) -> Config:
        problems = []
        for kind, items, key in (
            ("entry", self.entries, "name"),
            ("frontend", self.frontends, "name"),
            ("credential", self.credentials, "id"),
        ):
            seen = set()
            for item in items:
                name = getattr(item, key)
                if name in seen:
                    problems.append(f"duplicate {kind} {key} {name!r}")
                seen.add(name)
        entries = {e.name: e for e in self.entries}
        creds = {c.id for c in self.credentials}
        for entry in self.entries:
            takes = middlewares.get(entry.middleware).provision_types
            for c in self.credentials:
                # usable there by trust domain and auth method, so the factory would provision with it
                if (c.purpose == "provision" and c.trust_domain == entry.trust_domain
                        and entry.auth_tokens & c.auth_methods and c.type not in takes):
                    problems.append(f"credential {c.id!r} ({c.type}) cannot provision on entry {entry.name!r}: "
                                    f"the {entry.middleware} middleware takes {', '.join(takes)}")
        for entry in self.entries:
            tarball = entry.options.get("condor_tarball")
            if tarball and tarball not in self.factory.condor_tarballs:
                problems.append(f"entry {entry.name!r} names condor_tarball {tarball!r}, which factory.condor_tarballs "
                                "does not hold")
        for fe in self.frontends:
            for name in fe.entries:
                if name not in entries:
                    problems.append(f"frontend {fe.name!r} names unknown entry {name!r}")
            for cid in fe.credentials:
                if cid not in creds:
                    problems.append(f"frontend {fe.name!r} names unknown credential {cid!r}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def endpoints(self) -> dict[str, list[Entry]]:
        """Entries by the API endpoint they call: one Airflow pool and one API budget each."""
        out: dict[str, list[Entry]] = {}
        for e in self.entries:
            out.setdefault(e.api_endpoint, []).append(e)
        return out

    def entry(self, name: str) -> Entry:
        return next(e for e in self.entries if e.name == name)

    def frontend(self, name: str) -> Frontend:
        for fe in self.frontends:
            if fe.name == name:
                return fe
        raise KeyError(f"no frontend {name!r} in the configuration")

    def credential(self, cid: str) -> Credential:
        for c in self.credentials:
            if c.id == cid:
                return c
        raise KeyError(f"no credential {cid!r} in the configuration")

    def policy_for(self, entry: Entry, frontend: str | None) -> PilotPolicy:
        """The entry's pilot policy with the frontend's overrides applied."""
        fe = next((f for f in self.frontends if f.name == frontend), None)
        if fe is None:
            return entry.policy
        overrides = {k: v for k, v in fe.policy.model_dump().items() if v is not None}
        return entry.policy.model_copy(update=overrides)


@lru_cache(maxsize=1)
def aws_regions() -> frozenset[str]:
    """Every region of botocore's partition data (its endpoints.json, read without importing botocore)."""
    import importlib.util
    import json

    spec = importlib.util.find_spec("botocore")
    if spec is None or spec.origin is None:
        return frozenset()
    try:
        with open(os.path.join(os.path.dirname(spec.origin), "data", "endpoints.json")) as f:
            partitions = json.load(f)["partitions"]
    except (OSError, ValueError, KeyError):
        return frozenset()
    return frozenset(r for p in partitions for r in p.get("regions", {}))


_NAME = re.compile(NAME)
_BRANCH = re.compile(r"^(str|int|float|bool|none|list|dict)$|\[")  # pydantic's union/validator tags


def _shown(name: Any, position: int) -> str:
    """A user's name as an error may print it: only a plain name, else its position (values are never echoed)."""
    return name if isinstance(name, str) and _NAME.match(name) else f"(key {position})"


def _loc(data: Any, loc: tuple) -> str:
    """A readable field path, naming list items by name: entries[aws-east].limits.max_pilots.

    A list item whose name is not a valid name is named by its index, and a
    key that is not a plain name by its position: the text may be a pasted secret.
    """
    parts: list[str] = []
    node = data
    for item in loc:
        if isinstance(item, int):
            child = node[item] if isinstance(node, list) and 0 <= item < len(node) else None
            name = (child.get("name") or child.get("id")) if isinstance(child, dict) else None
            parts.append(f"[{name}]" if isinstance(name, str) and _NAME.match(name) else f"[{item}]")
            node = child
        elif isinstance(item, str) and _BRANCH.search(item) and not (isinstance(node, dict) and item in node):
            continue
        else:
            keys = list(node) if isinstance(node, dict) else []
            parts.append(f".{_shown(item, keys.index(item) + 1 if item in keys else 0)}")
            node = node.get(item) if isinstance(node, dict) else None
    return "".join(parts).lstrip(".") or "(top level)"


def _message(err: dict) -> str:
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        return "unknown field"
    if err["type"] == "missing":
        return "required field is missing"
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    return msg


def parse_config(data: Any, path: str | os.PathLike = "<config>") -> Config:
    if not isinstance(data, dict):
        raise ConfigError(path, ["the file must hold a mapping with factory, entries, frontends, credentials"])
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_input=False, include_url=False):
            problems.append(f"{_loc(data, err['loc'])}: {_message(err)}")
        raise ConfigError(path, problems) from None


def load_config(path: str | os.PathLike) -> Config:
    """Load and validate one configuration file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(path, [f"cannot read the file: {exc.strerror}"]) from None
    try:
        data = _load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(path, [f"{where}not valid YAML ({getattr(exc, 'problem', None) or exc})"]) from None
    _resolve_paths(data, path.parent)
    return parse_config(data, path)


def _load_yaml(text: str) -> Any:
    """libyaml where installed (10x faster on a large file); the pure-Python parser words the errors."""
    try:
        return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError:
        return yaml.safe_load(text)


def _resolve_paths(data: Any, base: Path) -> None:
    """Relative queue files are relative to the configuration file."""
    if not isinstance(data, dict) or not isinstance(data.get("frontends"), list):
        return
    for fe in data["frontends"]:
        src = fe.get("demand") if isinstance(fe, dict) else None
        if isinstance(src, dict) and isinstance(src.get("queue_file"), str) and not os.path.isabs(src["queue_file"]):
            src["queue_file"] = str(base / src["queue_file"])


@lru_cache(maxsize=8)
def _cached(path: str, stamp: tuple[int, int]) -> Config:
    return load_config(path)


def config_path() -> str:
    """The configuration file named by Airflow's [glidein] config_file."""
    path = os.environ.get("AIRFLOW__GLIDEIN__CONFIG_FILE")
    if not path:
        from airflow.sdk import conf

        path = conf.get("glidein", "config_file", fallback=None)
    if not path:
        raise ConfigError("[glidein] config_file", ["not set: point it (or AIRFLOW__GLIDEIN__CONFIG_FILE) at the YAML file"])
    return path


def get_config(path: str | None = None) -> Config:
    """The configuration, re-read only when the file changes (cheap at DAG parse)."""
    path = path or config_path()
    try:
        st = os.stat(path)
        stamp = (st.st_mtime_ns, st.st_size)
    except OSError:
        stamp = (-1, -1)
    return _cached(str(path), stamp)


def pool_name(endpoint: str) -> str:
    """The Airflow pool of an API endpoint."""
    return "glidein_" + re.sub(r"[^A-Za-z0-9_.-]", "_", endpoint)
