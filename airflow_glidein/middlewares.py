"""What each middleware is, in one place, readable without importing its hook.

A middleware is described by a ``Middleware``: its name, the hook class that
talks to the provider (imported only when a hook is built: a hook module
pulls in boto3, openstacksdk, pyone or htcondor2, about a second each), the
credential types it can provision with, its UserData limit, the schema of an
entry's ``options``, and what it brings that the others do not (credential
types, Airflow connection forms). Configuration validation, provider info,
credential reading, the secrets hooks and UserData read it from here, so this
module stays free of Airflow and cheap to import. The quota reader and the
preflight checks are the hook's ``quota()`` and ``entry_checks()`` (the
contract of ``hooks/base.py``), reached through the hook class path.

More middlewares come from installed distributions, through the entry point
group ``airflow_glidein.middlewares`` (``name = "package.module:MIDDLEWARE"``,
the name being the middleware's). Entry points, not a setting: every
component (scheduler, workers, triggerer, API server, ``check-config``) sees
the same middlewares whenever the same packages are installed, which a
middleware needs anyway for its hook and its connection form; and reading
them needs no Airflow configuration in this Airflow-free module. They are
read only when a name is not built in, so configurations of built-in
middlewares never scan them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from airflow_glidein import material

ENTRY_POINT_GROUP = "airflow_glidein.middlewares"
Reader = Callable[[material.ConnFields, float], tuple[float | None, dict]]


@dataclass(frozen=True)
class CredentialType:
    """A kind of credential: where it lives, what it satisfies, how it is read without trusting it."""

    name: str
    conn_types: tuple[str, ...]  # Airflow connection types that may hold it
    auth_methods: frozenset[str]  # glideinWMS auth method names it satisfies
    read: Reader  # (fields, now) -> (expiry epoch or None, info); raises material.Invalid, never quotes it
    pilot: bool = False  # a pilot can join a pool with it (the bootstrap exchange hands it over)


class EntryOptions(BaseModel):
    """Options every middleware takes; each middleware's schema extends it. Unknown fields are errors."""

    # defer_build: a schema is built when an entry of its middleware is first validated, not at import
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    terminate_settle: Annotated[float, Field(ge=0)] | None = None  # s a termination may take before it is checked


@dataclass(frozen=True)
class Middleware:
    """One middleware, as everything but its hook needs to know it."""

    name: str
    hook: str  # "package.module.Class", a hooks.base.PilotHook subclass
    provision_types: tuple[str, ...]  # credential types its hook can talk to the provider with
    userdata_max_bytes: int  # raw UserData the provider takes, before any transport encoding
    options: type[EntryOptions] = EntryOptions  # the schema of an entry's ``options``
    vm: bool = True  # pilots are VMs booted from the entry's image and flavor (both required; UserData can be sealed)
    # pilots may wait in a queue before they start, and the provider says when they started (grid jobs):
    # boot timeout and lifetime run from that start, a pilot not started within policy.queue_timeout is
    # removed, and bootstrap tokens last queue_timeout + boot_timeout
    queued: bool = False
    credential_types: tuple[CredentialType, ...] = ()  # kinds it brings that no other middleware defines
    connection_forms: tuple[Mapping[str, Any], ...] = ()  # provider info "connection-types" it brings

    def hook_class(self) -> type:
        module, _, cls = self.hook.rpartition(".")
        return getattr(importlib.import_module(module), cls)

    @property
    def conn_types(self) -> tuple[str, ...]:
        """The Airflow connection types its provisioning connection may have."""
        return tuple(dict.fromkeys(c for t in self.provision_types for c in credential_type(t).conn_types))


# -- connection forms (provider info), shared with get_provider_info -----------

FORM_FIELDS = ["description", "host", "port", "login", "password", "schema", "extra"]


def form_hidden(*shown: str) -> list[str]:
    """The standard connection fields a form hides: all but ``shown`` (and the description)."""
    return [f for f in FORM_FIELDS if f not in shown and f != "description"]


def form_text(label: str, description: str, secret: bool = False, multiline: bool = False) -> dict:
    schema: dict = {"type": ["string", "null"]}
    if multiline:
        schema["format"] = "multiline"
    elif secret:
        schema["format"] = "password"
    return {"label": label, "description": description, "schema": schema}


# -- the built-in middlewares ------------------------------------------------

def _kind(name: str, conn_types: tuple[str, ...], auth: str, read: Reader, pilot: bool = False) -> CredentialType:
    return CredentialType(name, conn_types, frozenset({auth}), read, pilot)


# Kinds every middleware may meet: what pilots join a pool with, and SSH keys.
COMMON_CREDENTIAL_TYPES = (
    _kind("x509_proxy", ("glidein_x509", "generic"), "grid_proxy", material.read_x509_proxy, pilot=True),
    _kind("idtoken", ("glidein_token", "generic"), "idtoken", material.read_token, pilot=True),
    _kind("scitoken", ("glidein_token", "generic"), "scitoken", material.read_token, pilot=True),
    _kind("ssh_key", ("glidein_ssh", "generic"), "ssh_key", material.read_ssh_key),
)

Names = list[Annotated[str, Field(min_length=1)]]


class EC2Options(EntryOptions):
    subnet_id: str | None = None
    key_name: str | None = None
    security_group_ids: Names | None = None
    instance_profile: str | None = None  # an IAM instance profile name
    spot: bool = False  # one-time spot instances, terminated on interruption
    spot_max_price: Annotated[float, Field(gt=0)] | None = None  # default: the on-demand price
    # what the endpoint honours (airflow_glidein/ec2_profiles.py): aws | eucalyptus | generic; default aws,
    # generic for an entry that names an endpoint other than AWS's own (an EC2-compatible cloud)
    profile: str | None = None
    max_per_call: Annotated[int, Field(ge=1)] | None = None  # instances per RunInstances (default: the profile's)
    # what marks a launch where tags cannot be trusted: its own key pair (default), or its own (empty)
    # security group where the site keeps its key_name
    marker: Literal["key_pair", "security_group"] | None = None

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, v: str | None) -> str | None:
        from airflow_glidein.ec2_profiles import PROFILES

        if v is not None and v not in PROFILES:
            raise ValueError(f"unknown profile {v!r}; known: {', '.join(PROFILES)}")
        return v


class OpenStackOptions(EntryOptions):
    network: str | None = None  # a network id
    networks: Names | None = None  # network ids; neither: Nova's "auto"
    key_name: str | None = None
    security_groups: Names | None = None  # names
    config_drive: bool = False
    availability_zone: str | None = None
    multi_create: bool = True  # one create call per batch (min_count/max_count)
    server_tags: bool = True  # server tags where Nova >= 2.52; else the name regex

    @model_validator(mode="after")
    def _one_network_field(self) -> OpenStackOptions:
        if self.network and self.networks:
            raise ValueError("name network or networks, not both")
        return self


class OpenNebulaOptions(EntryOptions):
    image_uname: str | None = None  # the image's owner, when the image is named rather than numbered


GRID_TYPES = ("ec2", "condor", "arc", "batch")


class HTCondorGOptions(EntryOptions):
    grid_resource: str  # as HTCondor spells it: "ec2 URL", "condor CE CE:9619", "arc HOST", "batch slurm user@host"
    schedd: str | None = None  # default: the local schedd
    collector: str | None = None
    executable: str | None = None  # the grid pilot to transfer (default: the package's glidein-grid-pilot.sh)
    condor_tarball: str | None = None  # a factory.condor_tarballs name: HTCondor for worker nodes without it
    max_releases: Annotated[int, Field(ge=0, le=100)] = 3  # releases of a held pilot before it is removed
    credential_dir: str | None = None
    log_dir: str | None = None
    ec2_keypair: str | None = None
    ec2_security_groups: str | None = None
    ec2_vpc_subnet: str | None = None

    @field_validator("grid_resource")
    @classmethod
    def _grid_type(cls, value: str) -> str:
        if value.strip().split(" ", 1)[0] not in GRID_TYPES:
            raise ValueError(f"must start with {', '.join(GRID_TYPES[:-1])} or {GRID_TYPES[-1]}")
        return value.strip()


def _openstack_form() -> dict:
    return {
        "connection-type": "glidein_openstack",
        "hook-class-name": "airflow_glidein.secrets.OpenStackCredentialHook",
        "hook-name": "Glidein OpenStack credential",
        "conn-fields": {
            "auth_type": {"label": "Auth type", "schema": {"type": ["string", "null"],
                          "enum": ["application_credential", "password"], "default": "application_credential"}},
            "project_name": form_text("Project name", "Password auth: the project to scope to"),
            "project_id": form_text("Project id", "Password auth: instead of the project name"),
            "user_domain_name": form_text("User domain", "Password auth (default: Default)"),
            "project_domain_name": form_text("Project domain", "Password auth (default: Default)"),
            "region_name": form_text("Region", "Optional"),
            "expires_at": form_text("Expires at", "Optional: the application credential's expiry (ISO 8601)"),
        },
        "ui-field-behaviour": {
            "hidden-fields": form_hidden("host", "login", "password", "extra"),
            "relabeling": {"host": "Auth URL (Keystone)", "login": "Application credential id or user name",
                           "password": "Secret or password"},
            "placeholders": {"host": "https://keystone.example.org:5000/v3"},
        },
    }


def _opennebula_form() -> dict:
    return {
        "connection-type": "glidein_opennebula",
        "hook-class-name": "airflow_glidein.secrets.OpenNebulaCredentialHook",
        "hook-name": "Glidein OpenNebula user",
        "conn-fields": {},
        "ui-field-behaviour": {
            "hidden-fields": form_hidden("host", "login", "password"),
            "relabeling": {"host": "XML-RPC endpoint", "login": "User", "password": "Password or token"},
            "placeholders": {"host": "https://one.example.org:2633/RPC2"},
        },
    }


BUILTIN = {m.name: m for m in (
    Middleware(
        name="ec2", hook="airflow_glidein.hooks.ec2.EC2PilotHook", provision_types=("ec2_key_pair",),
        userdata_max_bytes=16384,  # EC2: 16 KB before base64
        options=EC2Options,
        credential_types=(_kind("ec2_key_pair", ("aws",), "key_pair", material.read_aws),),
    ),
    Middleware(
        name="openstack", hook="airflow_glidein.hooks.openstack.OpenStackPilotHook",
        provision_types=("openstack_app_credential", "openstack_password"),
        userdata_max_bytes=65535,  # Nova: 64 KB
        options=OpenStackOptions,
        credential_types=(
            _kind("openstack_app_credential", ("glidein_openstack", "generic"), "app_credential",
                  material.read_openstack("openstack_app_credential")),
            _kind("openstack_password", ("glidein_openstack", "generic"), "username_password",
                  material.read_openstack("openstack_password")),
        ),
        connection_forms=(_openstack_form(),),
    ),
    Middleware(
        name="opennebula", hook="airflow_glidein.hooks.opennebula.OpenNebulaPilotHook",
        provision_types=("opennebula_password",),
        userdata_max_bytes=65535,  # base64 in a CONTEXT variable; we keep Nova's cap
        options=OpenNebulaOptions,
        credential_types=(
            _kind("opennebula_password", ("glidein_opennebula", "generic"), "username_password",
                  material.read_opennebula),
        ),
        connection_forms=(_opennebula_form(),),
    ),
    Middleware(
        name="htcondor_g", hook="airflow_glidein.hooks.htcondor_g.HTCondorGPilotHook",
        # the grid credential (a proxy or a token), or an access key pair for ec2 grid resources
        provision_types=("x509_proxy", "idtoken", "scitoken", "ec2_key_pair"),
        userdata_max_bytes=65535,
        options=HTCondorGOptions,
        vm=False,  # worker nodes we do not build (ec2 grid resources still take image and flavor)
        queued=True,  # a grid job waits at the schedd and at the site before it starts
    ),
)}


# -- the registry ------------------------------------------------------------

class Unknown(ValueError):
    """A middleware or credential type no built-in or installed middleware describes."""


@lru_cache(maxsize=1)
def _installed() -> tuple[dict[str, Middleware], dict[str, str]]:
    """Middlewares of installed distributions, and why each that could not be loaded was not."""
    from importlib.metadata import entry_points

    found: dict[str, Middleware] = {}
    broken: dict[str, str] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        where = f"entry point {ep.name} = {ep.value}"
        try:
            m = ep.load()
        except Exception as exc:  # one broken package must not hide the others
            broken[ep.name] = f"{where} cannot be loaded ({type(exc).__name__}: {exc})"
            continue
        if not isinstance(m, Middleware):
            broken[ep.name] = f"{where} is not an airflow_glidein.middlewares.Middleware"
        elif m.name != ep.name:
            broken[ep.name] = f"{where} describes a middleware named {m.name!r}"
        elif m.name in BUILTIN:
            broken[ep.name] = f"{where} names a built-in middleware"
        else:
            found[m.name] = m
    if broken:
        import logging  # not at import: configuration validation stays cheap

        for reason in broken.values():
            logging.getLogger(__name__).warning("Middleware not loaded: %s", reason)
    return found, broken


def reload() -> None:
    """Read the installed middlewares again (after installing one into a running process)."""
    _installed.cache_clear()
    _credential_types.cache_clear()


def get(name: str) -> Middleware:
    if name in BUILTIN:
        return BUILTIN[name]
    found, broken = _installed()
    if name in found:
        return found[name]
    if name in broken:
        raise Unknown(f"middleware {name} is installed but unusable: {broken[name]}")
    raise Unknown(f"unknown middleware; known: {', '.join(names())}")


def names() -> list[str]:
    return [*BUILTIN, *sorted(_installed()[0])]


def all_middlewares() -> list[Middleware]:
    return [get(n) for n in names()]


BUILTIN_CREDENTIAL_TYPES = {k.name: k for k in (*COMMON_CREDENTIAL_TYPES,
                                                 *(k for m in BUILTIN.values() for k in m.credential_types))}


@lru_cache(maxsize=1)
def _credential_types() -> dict[str, CredentialType]:
    """Every credential type: built-in ones, then those installed middlewares bring (a built-in name stays built-in)."""
    kinds = dict(BUILTIN_CREDENTIAL_TYPES)
    for m in all_middlewares():
        for k in m.credential_types:
            kinds.setdefault(k.name, k)
    return kinds


def credential_type(name: str) -> CredentialType:
    """A credential type by name (a built-in one without reading the installed middlewares)."""
    kind = BUILTIN_CREDENTIAL_TYPES.get(name) or _credential_types().get(name)
    if kind is None:
        raise Unknown(f"unknown credential type; known: {', '.join(sorted(_credential_types()))}")
    return kind


def credential_types_for(conn_type: str) -> list[str]:
    """The credential types a connection of this type may hold, in declaration order."""
    return [k.name for k in _credential_types().values() if conn_type in k.conn_types]


def auth_methods(installed: bool = True) -> set[str]:
    """The auth method names credential types satisfy (``installed=False``: the built-in ones only)."""
    kinds = _credential_types() if installed else BUILTIN_CREDENTIAL_TYPES
    return set().union(*(k.auth_methods for k in kinds.values()))


def pilot_credential_types() -> list[str]:
    """The credential types a pilot can join a pool with."""
    return [k.name for k in _credential_types().values() if k.pilot]
