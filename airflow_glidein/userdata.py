"""The UserData envelope: the only dynamic input a cloud VM gets.

It names the launch and says where to fetch the startup script; it never
carries a long-lived secret (the provider, and anyone on the VM, can read
UserData). Each middleware caps its size; a too-large envelope is refused
here with a clear error instead of by the provider.
"""

from __future__ import annotations

import base64
import json
from typing import Any

VERSION = 1
HEADER = "#glidein-envelope"
MAX_BYTES = {"ec2": 16384, "openstack": 65535, "opennebula": 65535, "htcondor_g": 65535}


class UserDataTooLarge(ValueError):
    pass


def build(middleware: str, payload: dict[str, Any]) -> str:
    body = base64.b64encode(json.dumps({"v": VERSION, **payload}, sort_keys=True, separators=(",", ":")).encode()).decode()
    text = f"{HEADER} v{VERSION}\n{body}\n"
    limit = MAX_BYTES[middleware]
    if len(text.encode()) > limit:
        raise UserDataTooLarge(
            f"UserData envelope is {len(text.encode())} bytes, over the {middleware} limit of {limit} bytes"
        )
    return text


def parse(text: str) -> dict[str, Any]:
    lines = text.strip().splitlines()
    if len(lines) != 2 or not lines[0].startswith(HEADER):
        raise ValueError("not a glidein UserData envelope")
    return json.loads(base64.b64decode(lines[1]))
