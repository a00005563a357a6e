"""Preflight: ask once for everything a cycle will need, before pilots fail for it.

HTCondor annex launches with no quota, image or collector check, so a wrong
AMI shows up as boot failures long after. ``python -m airflow_glidein
preflight`` checks each credential (readable, valid), each entry with each
of its provisioning connections (the provider answers, the image and the
flavor or template exist; for EC2, what the endpoint honours against the
entry's quirk profile, a launching probe only with ``probe_launch``), the collector, and the bootstrap service (it
answers and signs with the factory's key, i.e. shares its state store).
Every check runs whatever the others found; each result names what is wrong.
"""

from __future__ import annotations

import time
import urllib.request
from dataclasses import dataclass

from airflow_glidein import material, secrets
from airflow_glidein.config import Config
from airflow_glidein.credentials import usable_on


@dataclass(frozen=True)
class Check:
    scope: str  # "credential X", "entry Y", "factory"
    what: str
    ok: bool
    detail: str


def run(config: Config, entries: list[str] | None = None, now: float | None = None,
        probe_launch: bool = False) -> list[Check]:
    """Every check, in order: credentials (of the chosen entries' trust domains), entries, factory.

    A state store that cannot serve the factory (unreadable, unreachable, or a SQLite file under a
    distributed executor) is the one check: no cycle could run, so nothing else is asked.
    """
    store = _state_store()
    if not store.ok:
        return [store]
    now = time.time() if now is None else now
    chosen = [config.entry(n) for n in entries] if entries else list(config.entries)
    domains = {e.trust_domain for e in chosen}
    validity = secrets.check(config, [c.id for c in config.credentials if c.trust_domain in domains], now)
    out = [Check(f"credential {cid}", "connection readable, credential valid", v.ok,
                 material.describe(v) if v.ok else v.reason) for cid, v in sorted(validity.items())]
    for entry in chosen:
        out += _entry(config, entry, validity, probe_launch)
    if config.factory.collector:
        out.append(_collector(config.factory.collector))
    out.append(_bootstrap(config.factory.bootstrap_url))
    return [store, *out]


def _state_store() -> Check:
    from airflow_glidein import state

    try:
        st = state.store()
    except state.StateStoreError as exc:
        return Check("factory", "state store", False, str(exc))
    return Check("factory", "state store", True, f"{st.engine.url.render_as_string(hide_password=True)}, "
                                                 f"schema revision {st.revision}")


def _entry(config: Config, entry, validity, probe_launch: bool = False) -> list[Check]:
    from airflow_glidein.hooks import pilot_hook

    scope = f"entry {entry.name}"
    creds = [c for c in config.credentials if c.purpose == "provision" and usable_on(c, entry)]
    if not creds:
        return [Check(scope, "provision credential", False,
                      f"no provision credential of trust domain {entry.trust_domain!r} with auth {entry.auth_method!r}")]
    out = []
    for cred in creds:
        if not validity[cred.id].ok:
            out.append(Check(scope, f"provider via {cred.id}", False, f"credential unusable: {validity[cred.id].reason}"))
            continue
        try:
            hook = pilot_hook(entry, config.factory.name, cred.conn_id)
            hook.probe_launch = probe_launch  # only a hook that has a launching probe reads it (EC2)
            results = hook.preflight()
        except Exception as exc:  # one entry's provider must not stop the checks of the others
            results = [("provider answers", False, f"{type(exc).__name__}: {str(exc)[:300]}")]
        out += [Check(scope, f"{what} via {cred.id}", ok, detail) for what, ok, detail in results]
    return out


def _collector(address: str) -> Check:
    from airflow_glidein.hooks.htcondor import HTCondorHook

    ok, detail = HTCondorHook(collector=address).test_connection()
    return Check("factory", f"collector {address}", ok, detail)


def _bootstrap(url: str) -> Check:
    from airflow_glidein.bootstrap import keys
    from airflow_glidein.state import store

    from airflow_glidein import userdata

    what = f"bootstrap service {url}"
    try:
        ring = keys.key_ring(store())
    except keys.KeyUnavailable as exc:
        return Check("factory", what, False, f"the factory cannot sign: {exc}")
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/bootstrap/pubkey.pem", timeout=10) as resp:
            served = resp.read().decode()
    except Exception as exc:
        return Check("factory", what, False, f"not reachable from here: {type(exc).__name__}: {exc}")
    if served.strip() != userdata.public_pem(ring.signing).strip():
        return Check("factory", what, False, "it signs with another key than this factory's: it does not share "
                                              "the factory's state store (GLIDEIN_STATE_URL), so no token it is "
                                              "asked to exchange would be found")
    ids = list(ring.accepted())
    previous = f"; previous key id {ids[1]} still accepted" if len(ids) > 1 else ""
    return Check("factory", what, True, f"answers, same signing key and state store (key id {ids[0]}{previous})")
