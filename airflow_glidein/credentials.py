"""Credential selection by trust domain (glideinWMS's model, made explicit).

A credential of a trust domain is usable on every entry of that domain whose
auth method it satisfies. For each (frontend, entry) the frontend picks one
``provision`` credential (to talk to the provider) and one ``pilot``
credential (handed to the pilot through the bootstrap exchange). A
credential must outlive the pilot (its ``min_lifetime``, default the pilot's
max_lifetime): the factory lists and terminates with the provisioning
credential, and the pilot authenticates with its own, until it retires.
Among the usable ones the longest remaining lifetime wins; ties rotate from
cycle to cycle. An entry with no usable credential is left out of the
cycle, with the reason.

The rotation position is kept in the state store, keyed by cycle: a retry of
the same cycle picks the same credential, the next cycle the next one. (A
position derived from the run alone would not rotate evenly: manual and
asset-triggered runs have no regular period.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from sqlalchemy import Column, String, Table, delete, insert, select as sql_select

from airflow_glidein.config import Config, Credential, Entry
from airflow_glidein.material import Validity, duration
from airflow_glidein.state import METADATA, StateStore

__all__ = ["Validity", "usable_on", "select", "ignored_vo_image", "refuse_ask", "image_for", "load_rotation",
           "save_rotation"]

TIE_SECONDS = 600  # lifetimes this close count as equal (renewals of one proxy differ by minutes)
PURPOSES = ("provision", "pilot")
Last = Mapping[tuple[str, str], tuple[str, str]]  # (entry, purpose) -> (cycle, credential id)

ROTATION = Table(
    "glidein_credential_rotation",
    METADATA,
    Column("frontend", String(64), primary_key=True),
    Column("entry", String(64), primary_key=True),
    Column("purpose", String(16), primary_key=True),
    Column("credential", String(64), nullable=False),
    Column("cycle", String(250), nullable=False),
)


def usable_on(cred: Credential, entry: Entry) -> bool:
    if cred.trust_domain != entry.trust_domain:
        return False
    if cred.purpose == "provision":
        return bool(entry.auth_tokens & cred.auth_methods)
    return True


def rotate(tied: list[str], last: tuple[str, str] | None, cycle: str) -> str:
    """The next of equally good credentials (sorted ids) after the one used last."""
    if last is not None:
        last_cycle, last_id = last
        if last_cycle == cycle and last_id in tied:
            return last_id  # a retry of the same cycle
        return next((t for t in tied if t > last_id), tied[0])
    return tied[0]


def _pick(
    candidates: list[Credential], validity: Mapping[str, Validity], lifetime: int, last, cycle: str
) -> tuple[str | None, dict[str, str]]:
    """The chosen id (or None) and why each refused candidate was refused."""
    usable: dict[str, float] = {}
    refused = {}
    for c in candidates:
        v = validity.get(c.id, Validity(True))
        need = c.min_lifetime if c.min_lifetime is not None else lifetime
        if not v.ok:
            refused[c.id] = v.reason
        elif v.remaining is not None and v.remaining < need:
            refused[c.id] = f"expires in {duration(v.remaining)}, before the {duration(need)} it must last"
        else:
            usable[c.id] = math.inf if v.remaining is None else v.remaining
    if not usable:
        return None, refused
    best = max(usable.values())
    tied = sorted(cid for cid, r in usable.items() if r == best or best - r <= TIE_SECONDS)
    return rotate(tied, last, cycle), refused


def select(
    config: Config,
    frontend: str,
    validity: Mapping[str, Validity] | None = None,
    last: Last | None = None,
    cycle: str = "",
) -> dict[str, dict]:
    """Per entry of the frontend: {"provision", "pilot"[, "image"]} ids, or {"skip": reason, "missing"}.

    ``validity`` is what reading each credential told (unread: usable);
    ``last`` the rotation position of the previous cycle. A chosen entry also
    maps under "refused" each candidate passed over to why.
    """
    fe = config.frontend(frontend)
    validity = validity or {}
    last = last or {}
    creds = [config.credential(cid) for cid in fe.credentials]
    out: dict[str, dict] = {}
    for name in fe.entries:
        entry = config.entry(name)
        lifetime = config.policy_for(entry, frontend).max_lifetime
        choice: dict = {}
        reasons: list[str] = []
        passed_over: dict[str, str] = {}
        for purpose in PURPOSES:
            candidates = [c for c in creds if c.purpose == purpose and usable_on(c, entry)]
            picked, refused = _pick(candidates, validity, lifetime, last.get((name, purpose)), cycle)
            if picked:
                choice[purpose] = picked
                passed_over.update(refused)
            elif candidates:
                why = "; ".join(f"{cid}: {r}" for cid, r in refused.items())
                reasons.append(f"no usable {purpose} credential ({why})")
            else:
                reasons.append(
                    f"no {purpose} credential of trust domain {entry.trust_domain!r}"
                    + (f" with auth method {entry.auth_method!r}" if purpose == "provision" else "")
                )
        if missing := [p for p in PURPOSES if p not in choice]:
            out[name] = {"skip": "; ".join(reasons), "missing": missing}
            continue
        if fe.vo_image and entry.allow_vo_image:
            choice["image"] = fe.vo_image
        if passed_over:
            choice["refused"] = passed_over
        out[name] = choice
    return out


def refuse_ask(config: Config, entry: Entry, ask: Mapping) -> str | None:
    """Why the factory must not launch a request's ask at this entry, or None.

    The factory checks again what the frontend chose: a stale request (the
    configuration changed) or a hand-made one must not use a credential of
    another trust domain.
    """
    for purpose in PURPOSES:
        cid = ask.get(purpose)
        if not cid:
            return f"the request names no {purpose} credential"
        try:
            cred = config.credential(cid)
        except KeyError:
            return f"{purpose} credential {cid!r} is not in the configuration"
        if cred.purpose != purpose or not usable_on(cred, entry):
            return f"credential {cid!r} is not a {purpose} credential usable at trust domain {entry.trust_domain!r}"
    return None


def image_for(entry: Entry, ask: Mapping) -> str | None:
    """The request's (VO) image where the entry allows one, else the entry's own."""
    return ask.get("image") if ask.get("image") and entry.allow_vo_image else entry.image


def ignored_vo_image(config: Config, frontend: str) -> list[str]:
    """Entries of the frontend that do not allow its VO image (they use their own)."""
    fe = config.frontend(frontend)
    if not fe.vo_image:
        return []
    return [e for e in fe.entries if not config.entry(e).allow_vo_image]


def load_rotation(store: StateStore, frontend: str) -> dict[tuple[str, str], tuple[str, str]]:
    with store.begin() as conn:
        rows = conn.execute(sql_select(ROTATION).where(ROTATION.c.frontend == frontend)).all()
    return {(r.entry, r.purpose): (r.cycle, r.credential) for r in rows}


def save_rotation(store: StateStore, frontend: str, choice: Mapping[str, Mapping], cycle: str) -> None:
    rows = [
        {"frontend": frontend, "entry": entry, "purpose": p, "credential": c[p], "cycle": cycle}
        for entry, c in choice.items()
        for p in PURPOSES
        if p in c
    ]
    if not rows:
        return
    with store.begin() as conn:
        for r in rows:
            conn.execute(delete(ROTATION).where(
                (ROTATION.c.frontend == frontend) & (ROTATION.c.entry == r["entry"]) & (ROTATION.c.purpose == r["purpose"])
            ))
        conn.execute(insert(ROTATION), rows)
