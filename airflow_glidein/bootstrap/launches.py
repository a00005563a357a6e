"""The factory's side of a launch: register it, then build its signed UserData.

Called by SubmitPilotsOperator before the provider call, so the bootstrap
service knows the launch (and its token hash) by the time a VM boots.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from airflow_glidein import middlewares, userdata
from airflow_glidein.bootstrap import keys, tokens
from airflow_glidein.config import Config, Entry
from airflow_glidein.state import StateStore, store

PILOT_DIR = Path(__file__).resolve().parent.parent / "pilot"
STARTUP_SCRIPT = PILOT_DIR / "glidein-startup.sh"


def startup_script() -> bytes:
    return STARTUP_SCRIPT.read_bytes()


def userdata_for(cfg: Config, entry: Entry, batch: dict[str, Any], provision_conn: str,
                 st: StateStore | None = None, now: float | None = None) -> str:
    """Register ``batch`` (a plan_launches item) with a fresh bootstrap token; return its signed envelope.

    The token lives as long as the entry's boot timeout, plus its queue
    timeout where pilots wait in a queue before they start (grid jobs may
    queue for hours; the boot timeout runs from the start); only its hash is
    stored. A grid entry with a ``condor_tarball`` gets the release's name
    and SHA-256 signed into the envelope (the pilot checks what it fetches).
    An entry with ``encrypt_userdata`` gets the envelope sealed for its image
    key, with a log-only token in the clear.
    """
    st = st or store()
    now = time.time() if now is None else now
    policy = {k: int(v) for k, v in batch["policy"].items()}
    token = tokens.new_token()
    queued = middlewares.get(entry.middleware).queued
    expires = now + policy["boot_timeout"] + (policy.get("queue_timeout", 0) if queued else 0)
    release = entry.options.get("condor_tarball")
    tarball = {"condor_tarball": release, "condor_tarball_sha256": cfg.factory.condor_tarballs[release].sha256} \
        if release else {}
    payload = {
        "factory": cfg.factory.name,
        "entry": entry.name,
        "frontend": batch["frontend"],
        "launch_id": batch["launch_id"],
        "bootstrap_url": cfg.factory.bootstrap_url.rstrip("/"),
        "token": token,
        "token_expires": int(expires),
        "issued": int(now),
        "script_sha256": hashlib.sha256(startup_script()).hexdigest(),
        **tarball,
        **policy,
    }
    # Build first: an envelope too large for the middleware (or an entry without its image key) registers nothing.
    log_token = None
    if entry.encrypt_userdata:
        log_token = tokens.new_token()
        text = userdata.build(entry.middleware, payload, keys.signing_key(st), seal_to=keys.image_public_key(entry),
                              clear={"log_token": log_token})
    else:
        text = userdata.build(entry.middleware, payload, keys.signing_key(st))
    launch = tokens.Launch(
        launch_id=batch["launch_id"], factory=cfg.factory.name, entry=entry.name, frontend=batch["frontend"],
        count=int(batch["count"]), provision_conn=provision_conn, pilot_credential=batch.get("pilot"),
        start_expr=batch.get("start_expr") or "true", policy=policy, created=now,
    )
    tokens.register_launch(st, launch, token, expires, log_token)
    return text
