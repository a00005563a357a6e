"""Credential selection by trust domain (glideinWMS's model, made explicit).

A credential of a trust domain is usable on every entry of that domain whose
auth method it satisfies. For each (frontend, entry) the frontend picks one
``provision`` credential (to talk to the provider) and one ``pilot``
credential (handed to the pilot through the bootstrap exchange). An entry with
no usable credential is left out of the cycle, with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from airflow_glidein.config import Config, Credential, Entry


@dataclass(frozen=True)
class Validity:
    """What reading a credential's material told us (see the Airflow edge)."""

    ok: bool
    reason: str = ""
    remaining: float | None = None  # seconds of lifetime left; None: does not expire


def usable_on(cred: Credential, entry: Entry) -> bool:
    if cred.trust_domain != entry.trust_domain:
        return False
    if cred.purpose == "provision":
        return bool(entry.auth_tokens & cred.auth_methods)
    return True


def select(
    config: Config,
    frontend: str,
    validity: Mapping[str, Validity] | None = None,
) -> dict[str, dict]:
    """Per entry of the frontend: {"provision": id, "pilot": id} or {"skip": reason}."""
    fe = config.frontend(frontend)
    validity = validity or {}
    creds = [config.credential(cid) for cid in fe.credentials]
    out: dict[str, dict] = {}
    for name in fe.entries:
        entry = config.entry(name)
        choice: dict = {}
        reasons = []
        for purpose in ("provision", "pilot"):
            candidates = [c for c in creds if c.purpose == purpose and usable_on(c, entry)]
            valid = [c for c in candidates if validity.get(c.id, Validity(True)).ok]
            if valid:
                # longest remaining lifetime first; no expiry counts as longest
                valid.sort(key=lambda c: -(validity.get(c.id, Validity(True)).remaining or float("inf")))
                choice[purpose] = valid[0].id
            elif candidates:
                why = "; ".join(f"{c.id}: {validity[c.id].reason}" for c in candidates)
                reasons.append(f"no valid {purpose} credential ({why})")
            else:
                reasons.append(
                    f"no {purpose} credential of trust domain {entry.trust_domain!r}"
                    + (f" with auth method {entry.auth_method!r}" if purpose == "provision" else "")
                )
        if purpose_missing := [p for p in ("provision", "pilot") if p not in choice]:
            out[name] = {"skip": "; ".join(reasons), "missing": purpose_missing}
        else:
            out[name] = choice
    return out
