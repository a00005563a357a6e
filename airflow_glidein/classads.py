"""ClassAd helpers over the real classad2 bindings: parsing, references, matching.

A frontend's match_expr is a ClassAd expression over ``job.*`` (the job's ad)
and ``glidein.*`` (the attributes a pilot of the entry will advertise). An
entry may add ``requirements`` over the job (TARGET), as a machine's START
would. Both are evaluated at most once per (job group, entry), never per job;
in fact less often: a top-level ``a && b && c`` is split into its conjuncts
and each is evaluated once per distinct combination of the attribute values
*it* reads, so `job.RequestCpus <= glidein.Cpus` costs a handful of
evaluations however many groups and entries there are.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

import classad2
import htcondor2  # noqa: F401  importing it registers the StringList functions (stringListMember, split) with classad2

_ATTR = r"([A-Za-z_][A-Za-z0-9_]*)"
EXPR_PREFIX, EXPR_SUFFIX = "/Expr(", ")/"  # how condor_q -json writes a non-literal expression


def parse_expr(text: str) -> classad2.ExprTree:
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty ClassAd expression")
    try:
        return classad2.ExprTree(text)
    except Exception:
        raise ValueError("does not parse as a ClassAd expression") from None


@lru_cache(maxsize=256)
def _parsed(text: str) -> classad2.ExprTree:
    return parse_expr(text)


def refs(text: str | None, scope: str) -> set[str]:
    """Attributes an expression reads through ``scope.`` (job, glidein, TARGET, MY)."""
    if not text:
        return set()
    return {m.group(1) for m in re.finditer(rf"\b{scope}\s*\.\s*{_ATTR}", text, flags=re.IGNORECASE)}


def bare_refs(text: str | None, known: Iterable[str]) -> set[str]:
    """Attributes an entry's requirements read unscoped that the entry does not define (so: the job's)."""
    if not text:
        return set()
    return set(_bare_refs(text, tuple(sorted(known))))


@lru_cache(maxsize=256)  # entries of one site share their requirements: work it out once
def _bare_refs(text: str, known: tuple[str, ...]) -> frozenset[str]:
    ad = classad2.ClassAd({k: 0 for k in known})
    ad["__r"] = parse_expr(text)
    try:
        ext = ad.externalRefs(ad.lookup("__r"))
    except Exception:
        return frozenset()
    out = set()
    for name in ext:
        name = re.sub(r"^(TARGET|target)\.", "", name)
        if "." not in name:
            out.add(name)
    return frozenset(out)


def is_true(value: Any) -> bool:
    """HTCondor's notion of a satisfied Requirements: true, or a non-zero number."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, classad2.Value):
        return value != 0
    return False


def to_value(value: Any) -> Any:
    """A JSON value of condor_q -json as a ClassAd value: "/Expr(...)/" strings become expressions."""
    if isinstance(value, str) and value.startswith(EXPR_PREFIX) and value.endswith(EXPR_SUFFIX):
        try:
            return classad2.ExprTree(value[len(EXPR_PREFIX):-len(EXPR_SUFFIX)])
        except Exception:
            return value
    return value


def to_ad(attrs: Mapping[str, Any]) -> classad2.ClassAd:
    ad = classad2.ClassAd()
    for key, value in attrs.items():
        if value is None:
            continue
        ad[key] = to_value(value)
    return ad


def split_and(text: str) -> list[str]:
    """The top-level conjuncts of ``a && b && c``; [text] when the expression is not such a chain.

    Splitting is exact only when && is the loosest operator at the top level
    (no top-level || or ?:), which is checked; every piece must parse too.
    """
    s = text.strip()
    while s.startswith("(") and _closing(s) == len(s) - 1:
        s = s[1:-1].strip()
    pieces, start, skip = [], 0, False
    for i, c, depth in _walk(s):
        if skip:
            skip = False
            continue
        if depth:
            continue
        two = s[i:i + 2]
        if two == "||" or c == "?":
            return [text]
        if two == "&&":
            pieces.append(s[start:i].strip())
            start, skip = i + 2, True
    pieces.append(s[start:].strip())
    if len(pieces) < 2 or not all(pieces):
        return [text]
    try:
        for p in pieces:
            classad2.ExprTree(p)
    except Exception:
        return [text]
    return pieces


def _walk(s: str):
    """(index, char, bracket depth) of every character outside string literals."""
    depth, quote, i = 0, None, 0
    while i < len(s):
        c = s[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        else:
            if c in ")]}":
                depth -= 1
            yield i, c, depth
            if c in "([{":
                depth += 1
        i += 1


def _closing(s: str) -> int:
    """Where the bracket opening ``s`` closes (-1: never)."""
    for i, c, depth in _walk(s):
        if c == ")" and depth == 0:
            return i
    return -1


class _Part:
    """One memoised piece of the match: a conjunct of match_expr, or the entries' requirements."""

    def __init__(self, job_attrs: list[str] | None, entry_keys: list[tuple | None]):
        """``entry_keys``: per entry, the values of the entry that the part reads (equal keys, equal results)."""
        self.job_attrs = job_attrs  # None: reads the job in ways we cannot list; key on the whole job
        self.by_key: dict[tuple, int] = {}  # entry key -> bitmask of entries sharing it
        for i, k in enumerate(entry_keys):
            self.by_key[k] = self.by_key.get(k, 0) | (1 << i)
        self.cache: dict[Any, int] = {}  # job key -> bitmask of entries the part admits
        self.reps = [(k, (m & -m).bit_length() - 1) for k, m in self.by_key.items()]  # one entry stands for its key
        self.batch: classad2.ExprTree | None = None  # all entry keys in one evaluation (conjuncts only)


class Matcher:
    """Evaluates one frontend's match_expr and each entry's requirements against job groups.

    ``entries`` maps an entry name to (the attributes its pilots advertise, its
    requirements or None). The pilot's size (Cpus, Memory, GPUs among those
    attributes) is matched too, as glideinWMS's multicore policy does: a job
    that does not fit in one pilot never matches the entry.
    """

    def __init__(self, match_expr: str, entries: Mapping[str, tuple[Mapping[str, Any], str | None]]):
        parse_expr(match_expr)
        self.names = list(entries)
        self._glideins = []
        self._sizes = []
        for name, (attrs, requirements) in entries.items():
            glidein = to_ad(attrs)
            if requirements:
                glidein["Requirements"] = _parsed(requirements)
            self._glideins.append(glidein)
            lower = {k.lower(): v for k, v in attrs.items()}
            self._sizes.append((_num(lower.get("cpus"), 1), _num(lower.get("memory"), 0), _num(lower.get("gpus"), 0)))
        self._conjuncts = []
        for text in split_and(match_expr):
            job_attrs = None if re.search(r"\bjob\s*\[", text, re.I) else sorted(refs(text, "job"), key=str.lower)
            if re.search(r"\bglidein\s*\[", text, re.I):
                keys = [(i,) for i in range(len(self.names))]
            else:
                g_refs = sorted(refs(text, "glidein"), key=str.lower)
                keys = [tuple(_key(g.get(a)) for a in g_refs) for g in self._glideins]
            part = _Part(job_attrs, keys)
            part.batch = _batch(text, [(i, self._glideins[i]) for _, i in part.reps])
            self._conjuncts.append((parse_expr(text), part))
        self._scope = classad2.ClassAd()  # every entry's ad as glidein__<i>, for the batched conjuncts
        for i, glidein in enumerate(self._glideins):
            self._scope[f"glidein__{i}"] = glidein
        self._req = None
        req_entries = [i for i, g in enumerate(self._glideins) if "Requirements" in g]
        if req_entries:
            job_attrs: set[str] | None = set()
            for i in req_entries:
                text = entries[self.names[i]][1]
                if re.search(r"\btarget\s*\[", text, re.I):
                    job_attrs = None
                    break
                job_attrs |= refs(text, "TARGET") | bare_refs(text, entries[self.names[i]][0])
            # Entries without requirements share the key None (always admitted); the others are keyed by
            # their requirements and the values of their own attributes these read (sites of one kind share).
            keys = [self._requirements_key(i) if i in req_entries else None for i in range(len(self.names))]
            self._req = _Part(None if job_attrs is None else sorted(job_attrs, key=str.lower), keys)
        self._fit_cache: dict[tuple, int] = {}
        self.evaluations = 0  # ClassAd evaluations so far (benchmarks and tests read it)

    def matches(self, job: Mapping[str, Any], size: tuple[int, int, int] | None = None) -> list[str]:
        """Names of the entries (in configuration order) whose pilots the job group matches."""
        mask = self.match_mask(job, size)
        out = []
        while mask:
            low = mask & -mask
            out.append(self.names[low.bit_length() - 1])
            mask ^= low
        return out

    def match_mask(self, job: Mapping[str, Any], size: tuple[int, int, int] | None = None) -> int:
        lower = None
        mask = self._fits(size or job_size(job))
        for expr, part in self._conjuncts:
            if not mask:
                return 0
            if lower is None:
                lower = {k.lower(): v for k, v in job.items()}
            mask &= self._part(part, lower, job, self._conjunct(expr), wrap=True)
        if self._req is not None and mask:
            if lower is None:
                lower = {k.lower(): v for k, v in job.items()}
            mask &= self._part(self._req, lower, job, self._requirements, wrap=False)
        return mask

    def _part(self, part: _Part, lower: dict, job: Mapping[str, Any], test, wrap: bool) -> int:
        if part.job_attrs is None:
            key = tuple(sorted((k, _key(v)) for k, v in lower.items()))
        else:
            key = tuple(_key(lower.get(a.lower())) for a in part.job_attrs)
        cached = part.cache.get(key)
        if cached is not None:
            return cached
        job_ad = to_ad(job)
        admitted = None
        if part.batch is not None:
            self._scope["job"] = job_ad
            flags = part.batch.eval(self._scope)
            if isinstance(flags, str) and len(flags) == len(part.reps):
                self.evaluations += len(flags)
                admitted = 0
                for (ekey, _), flag in zip(part.reps, flags):
                    if flag == "1":
                        admitted |= part.by_key[ekey]
        if admitted is None:  # not batched, or an error somewhere in the batch: one entry at a time
            scope = job_ad
            if wrap:
                scope = classad2.ClassAd()
                scope["job"] = job_ad
            admitted = 0
            for ekey, i in part.reps:
                if ekey is None or test(scope, i):  # None: an entry without requirements admits every job
                    admitted |= part.by_key[ekey]
        part.cache[key] = admitted
        return admitted

    def _conjunct(self, expr: classad2.ExprTree):
        def test(scope: classad2.ClassAd, i: int) -> bool:
            self.evaluations += 1
            scope["glidein"] = self._glideins[i]
            return is_true(expr.eval(scope))

        return test

    def _requirements_key(self, i: int) -> tuple:
        glidein = self._glideins[i]
        try:
            req = glidein.lookup("Requirements")
            mine = set(glidein.internalRefs(req))
            mine |= {r.split(".", 1)[1] for r in glidein.externalRefs(req) if r.lower().startswith("my.")}
        except Exception:
            return (i,)
        return (str(glidein.lookup("Requirements")), *((a, _key(glidein.get(a))) for a in sorted(mine, key=str.lower)))

    def _requirements(self, job_ad: classad2.ClassAd, i: int) -> bool:
        self.evaluations += 1
        return bool(job_ad.matches(self._glideins[i]))  # glidein.Requirements with MY=glidein, TARGET=job

    def _fits(self, size: tuple[int, int, int]) -> int:
        mask = self._fit_cache.get(size)
        if mask is None:
            cpus, memory, gpus = size
            mask = 0
            for i, (c, m, g) in enumerate(self._sizes):
                if cpus <= c and (memory <= m or not m) and gpus <= g:
                    mask |= 1 << i
            self._fit_cache[size] = mask
        return mask



_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|[A-Za-z_][A-Za-z0-9_]*|\s+|.', re.S)


def _rebind(text: str, i: int) -> str:
    """``text`` with the scope name ``glidein`` renamed glidein__<i> (not inside strings, not after a dot)."""
    out, prev = [], ""
    for tok in _TOKEN.findall(text):
        if tok.lower() == "glidein" and prev != ".":
            tok = f"glidein__{i}"
        out.append(tok)
        if not tok.isspace():
            prev = tok
    return "".join(out)


def _batch(text: str, entries: list[tuple[int, classad2.ClassAd]]) -> classad2.ExprTree | None:
    """One expression giving, for every entry, "1" where ``text`` is true and "0" where it is not.

    One call into the evaluator instead of one per entry. Each entry's copy is
    first flattened with the entry's ad (its attributes become literals);
    what flattening leaves of ``glidein`` is renamed to the entry's ad in the
    scope. A number counts as true when non-zero and undefined as false, as
    for a single evaluation. An error in any entry makes the whole result an
    error: the caller then goes entry by entry.
    """
    if not entries:
        return None
    expr, scope, parts = parse_expr(text), classad2.ClassAd(), []
    for i, glidein in entries:
        scope["glidein"] = glidein
        try:
            flat = str(scope.flatten(expr))
        except Exception:
            flat = text
        parts.append(f'(ifThenElse({_rebind(flat, i)}, "1", "0") ?: "0")')
    try:
        return classad2.ExprTree("strcat(" + ", ".join(parts) + ")")
    except Exception:
        return None


def job_size(job: Mapping[str, Any]) -> tuple[int, int, int]:
    """(cores, memory MB, GPUs) a job group asks for; expressions are evaluated in the group's ad."""
    lower = None
    out = []
    for attr, canonical, default in (("requestcpus", "RequestCpus", 1), ("requestmemory", "RequestMemory", 0),
                                     ("requestgpus", "RequestGPUs", 0)):
        value = job.get(canonical)
        if value is None:
            if lower is None:
                lower = {k.lower(): v for k, v in job.items()}
            value = lower.get(attr)
        if isinstance(value, str) and value.startswith(EXPR_PREFIX):
            value = to_ad(job).eval(attr)
        out.append(_num(value, default))
    return out[0], out[1], out[2]


def _num(value: Any, default: int) -> int:
    if isinstance(value, bool):
        return default
    try:
        return max(int(value), 0)
    except (TypeError, ValueError):
        return default  # undefined or an expression we cannot evaluate: HTCondor's default applies


def _key(value: Any) -> Any:
    """A hashable stand-in for an attribute value (lists and nested ads by their text)."""
    if isinstance(value, (list, dict)):
        return repr(value)
    if isinstance(value, classad2.ExprTree):
        return str(value)
    return value
