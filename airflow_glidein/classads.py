"""ClassAd helpers over the real classad2 bindings: parsing, references, matching.

A frontend's match_expr is a ClassAd expression over ``job.*`` (the job's ad)
and ``glidein.*`` (the attributes a pilot of the entry will advertise). An
entry may add ``requirements`` over the job (TARGET), as a machine's START
would. Both are evaluated once per (job group, entry), never per job.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import classad2
import htcondor2  # noqa: F401  importing it registers the StringList functions (stringListMember, split) with classad2

_ATTR = r"([A-Za-z_][A-Za-z0-9_]*)"


def parse_expr(text: str) -> classad2.ExprTree:
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty ClassAd expression")
    try:
        return classad2.ExprTree(text)
    except Exception:
        raise ValueError("does not parse as a ClassAd expression") from None


def refs(text: str | None, scope: str) -> set[str]:
    """Attributes an expression reads through ``scope.`` (job, glidein, TARGET, MY)."""
    if not text:
        return set()
    return {m.group(1) for m in re.finditer(rf"\b{scope}\.{_ATTR}", text, flags=re.IGNORECASE)}


def bare_refs(text: str | None, known: Iterable[str]) -> set[str]:
    """Attributes an entry's requirements read unscoped that the entry does not define (so: the job's)."""
    if not text:
        return set()
    ad = classad2.ClassAd({k: 0 for k in known})
    ad["__r"] = parse_expr(text)
    try:
        ext = ad.externalRefs(ad.lookup("__r"))
    except Exception:
        return set()
    out = set()
    for name in ext:
        name = re.sub(r"^(TARGET|target)\.", "", name)
        if "." not in name:
            out.add(name)
    return out


def is_true(value: Any) -> bool:
    """HTCondor's notion of a satisfied Requirements: true, or a non-zero number."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, classad2.Value):
        return value != 0
    return False


def to_ad(attrs: Mapping[str, Any]) -> classad2.ClassAd:
    ad = classad2.ClassAd()
    for key, value in attrs.items():
        if value is None:
            continue
        ad[key] = value
    return ad


class Matcher:
    """Evaluates one frontend's match_expr and each entry's requirements.

    The ads of the entries are built once; ``matches`` evaluates each entry
    once for the group of jobs whose matching attributes are ``job``.
    """

    def __init__(self, match_expr: str, entries: Mapping[str, tuple[Mapping[str, Any], str | None]]):
        self._match = parse_expr(match_expr)
        self._entries = {}
        for name, (attrs, requirements) in entries.items():
            glidein = to_ad(attrs)
            if requirements:
                glidein["Requirements"] = parse_expr(requirements)
            self._entries[name] = glidein

    def matches(self, job: Mapping[str, Any]) -> list[str]:
        job_ad = to_ad(job)
        scope = classad2.ClassAd()
        scope["job"] = job_ad
        out = []
        for name, glidein in self._entries.items():
            scope["glidein"] = glidein
            if not is_true(self._match.eval(scope)):
                continue
            if "Requirements" in glidein and not job_ad.matches(glidein):  # glidein.Requirements with MY=glidein
                continue
            out.append(name)
        return out
