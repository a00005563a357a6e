"""Demand: idle and running jobs, grouped by what matching reads.

As glideinWMS does, jobs that look the same to the match (same values of the
attributes the match expressions read, and the same resource requests) form
one group, and the match runs once per group, never per job. Demand comes
from schedds (through a pool client, HTCondorHook in production: the schedd
groups with GroupBy where it can) or from a ``condor_q -json`` /
``condor_q -autocluster -json`` file, decoded with a typed streaming decoder
that keeps only the attributes matching reads.
"""

from __future__ import annotations

import multiprocessing
import operator
import re
import time
from multiprocessing import connection as mp_connection
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from airflow_glidein import classads

IDLE, RUNNING = 1, 2
RESOURCE_ATTRS = ("RequestCpus", "RequestMemory", "RequestGPUs")
OLD_IDLE_SECONDS = 600  # glideinWMS: jobs idle this long count toward the idle reserve
CHUNK_BYTES = 8 << 20  # the file decoder's read size: memory stays flat whatever the file's size


@dataclass
class JobGroup:
    attrs: dict[str, Any]  # the values matching reads, Request* included
    idle: int = 0
    running: int = 0
    idle_old: int = 0
    entries: list[str] = field(default_factory=list)  # filled by matching
    size: tuple[int, int, int] | None = None  # (cores, memory MB, GPUs) per job, evaluated by matching

    @property
    def cpus(self) -> int:
        return (self.size or classads.job_size(self.attrs))[0]

    @property
    def memory(self) -> int:
        return (self.size or classads.job_size(self.attrs))[1]

    @property
    def gpus(self) -> int:
        return (self.size or classads.job_size(self.attrs))[2]

    def to_dict(self) -> dict:
        return {"attrs": self.attrs, "idle": self.idle, "running": self.running,
                "idle_old": self.idle_old, "entries": self.entries, "size": list(self.size) if self.size else None}

    @classmethod
    def from_dict(cls, d: Mapping) -> JobGroup:
        size = d.get("size")
        return cls(dict(d["attrs"]), d["idle"], d["running"], d.get("idle_old", 0), list(d.get("entries", [])),
                   tuple(size) if size else None)


def match_attributes(match_expr: str, entries: Iterable) -> list[str]:
    """Job attributes the frontend's match and the entries' requirements read (one spelling each)."""
    found = list(RESOURCE_ATTRS) + sorted(classads.refs(match_expr, "job"))
    for entry in entries:
        if entry.requirements:
            found += sorted(classads.refs(entry.requirements, "TARGET"))
            found += sorted(classads.bare_refs(entry.requirements, entry.machine_attrs()))
    seen: dict[str, str] = {}
    for name in found:
        seen.setdefault(name.lower(), name)  # ClassAd names are case-insensitive; Request* keep HTCondor's spelling
    return sorted(seen.values(), key=str.lower)


class Grouper:
    """Counts idle / running / old idle jobs per distinct tuple of attribute values."""

    def __init__(self, attrs: list[str]):
        self.attrs = list(attrs)
        self.counts: dict[tuple, list[int]] = {}

    def add(self, key: tuple, idle: int = 0, running: int = 0, idle_old: int = 0) -> None:
        try:
            c = self.counts.get(key)
        except TypeError:  # a list or nested ad among the values
            key = tuple(classads._key(v) for v in key)
            c = self.counts.get(key)
        if c is None:
            c = self.counts[key] = [0, 0, 0]
        c[0] += idle
        c[1] += running
        c[2] += idle_old

    def add_ads(self, ads: Iterable[Mapping[str, Any]], now: float | None = None, old_only: bool = False) -> None:
        """Job ads ({attr: value}, JobStatus, QDate) or aggregate ads (JobCount, from GroupBy or autoclusters).

        An aggregate ad without JobStatus counts as idle, and as old (it
        carries no queue date: an autocluster is settled demand). With
        ``old_only`` the ads are idle jobs already counted, here only to say
        how many of them are old (a schedd's second GroupBy query).
        """
        cutoff = (time.time() if now is None else now) - OLD_IDLE_SECONDS
        spelled = None
        counts: dict[tuple, list[int]] = {}  # (values) -> [idle, running, old], flushed into self at the end
        for ad in ads:
            if spelled is None:
                spelled = _spelling(ad, self.attrs)
            get = ad.get
            key = tuple(map(get, spelled))
            try:
                c = counts.get(key)
            except TypeError:  # a list or nested ad among the values
                key = tuple(classads._key(v) for v in key)
                c = counts.get(key)
            if c is None:
                c = counts[key] = [0, 0, 0]
            jc = get("JobCount")
            weight = 1 if jc is None else _count(jc)
            if old_only:
                c[2] += weight
                continue
            status = get("JobStatus")
            if status == IDLE or (status is None and jc is not None):
                c[0] += weight
                qdate = get("QDate")
                if (qdate is not None and qdate <= cutoff) or (jc is not None and status is None and qdate is None):
                    c[2] += weight
            elif status == RUNNING:
                c[1] += weight
        for key, (idle, running, old) in counts.items():
            self.add(key, idle, running, old)

    def groups(self) -> list[JobGroup]:
        out = []
        for key, (idle, running, old) in self.counts.items():
            if idle or running:
                attrs = {a: v for a, v in zip(self.attrs, key) if v is not None}
                out.append(JobGroup(attrs, idle, running, min(old, idle)))
        return out


def _spelling(ad: Mapping[str, Any], attrs: list[str]) -> list[str]:
    """The keys under which ``ad`` holds ``attrs`` (ClassAd names are case-insensitive)."""
    have = {k.lower(): k for k in ad}
    return [have.get(a.lower(), a) for a in attrs]


def _count(value: Any) -> int:
    if value is None:
        return 1
    try:
        return max(int(value), 0)
    except (TypeError, ValueError):
        return 0


def group_jobs(ads: Iterable[Mapping[str, Any]], attrs: list[str], now: float | None = None) -> list[JobGroup]:
    """Group job ads (idle and running only) by the values of ``attrs``."""
    g = Grouper(attrs)
    g.add_ads(ads, now)
    return g.groups()


# ---- the file source: a typed streaming decoder ------------------------------------------------


def read_queue_file(path: str, attrs: list[str], now: float | None = None) -> list[JobGroup]:
    """Demand from a ``condor_q -json`` or ``condor_q -autocluster -json`` file.

    Decodes in chunks of whole ads with msgspec into Structs holding only
    ``attrs`` (and JobStatus, QDate, JobCount), so neither the file nor the
    jobs are ever all in memory; the other attributes are skipped unparsed.
    """
    now = time.time() if now is None else now
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise ValueError(f"cannot read queue file {path}: {exc.strerror}") from None
    with fh:
        head = fh.read(1 << 16)
        if not head.lstrip():
            return []
        if not head.lstrip().startswith(b"["):
            raise ValueError(f"queue file {path} is not condor_q -json output: expected a list of ads")
        fields = [_spell(head, a) for a in attrs]
        struct = msgspec.defstruct(
            "JobAd",
            [(f"a{i}", Any, None) for i in range(len(attrs))]
            + [("JobStatus", int | None, None), ("QDate", float | None, None), ("JobCount", int | None, None)],
            rename={**{f"a{i}": name for i, name in enumerate(fields)},
                    **{k: _spell(head, k) for k in ("JobStatus", "QDate", "JobCount")}},
            gc=False,
        )
        decoder = msgspec.json.Decoder(list[struct])
        grouper = Grouper(attrs)
        fh.seek(0)
        try:
            for chunk in _chunks(fh):
                _group_structs(grouper, decoder.decode(chunk), len(attrs), now)
        except (msgspec.DecodeError, msgspec.ValidationError):
            # A chunk cut inside a string value (or a bad file): decode it whole, which is
            # exact, and whose error names the real position.
            fh.seek(0)
            grouper = Grouper(attrs)
            try:
                _group_structs(grouper, decoder.decode(fh.read()), len(attrs), now)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise ValueError(f"queue file {path} is not condor_q -json output: {exc}") from None
    return grouper.groups()


def _spell(head: bytes, attr: str) -> str:
    """How the file spells an attribute (JSON keys are case-sensitive, ClassAd names are not)."""
    m = re.search(rb'"(' + re.escape(attr.encode()) + rb')"\s*:', head, flags=re.IGNORECASE)
    return m.group(1).decode() if m else attr


def _chunks(fh) -> Iterable[memoryview]:
    """The top-level array in pieces of whole ads, each framed in place as a JSON array (no copies).

    A piece ends at a '}' followed by ','; the byte before its first '{' and
    the one after its last '}' are overwritten with '[' and ']'. A piece cut
    inside a string value or a nested ad is not valid JSON, so the caller's
    decode fails and it decodes the whole file instead.
    """
    buf = bytearray()
    while True:
        data = fh.read(CHUNK_BYTES)
        buf += data
        cut = _last_boundary(buf) if data else buf.rfind(b"}")
        if cut < 0:
            if data:
                continue
            if buf.strip(b" \t\r\n[],"):
                raise msgspec.DecodeError("truncated: an ad does not end")
            return
        start = buf.find(b"{")
        if start < 1 or start > cut:
            raise msgspec.DecodeError("no ad where one was expected")
        if cut + 1 == len(buf):
            buf += b" "
        buf[start - 1], buf[cut + 1] = ord("["), ord("]")
        yield memoryview(buf)[start - 1:cut + 2]
        buf = buf[cut + 2:]
        if not data:
            if buf.strip(b" \t\r\n]"):
                raise msgspec.DecodeError("text after the last ad")
            return


def _last_boundary(buf: bytearray) -> int:
    """Index of the last '}' that is followed by ',' (the end of a whole ad), or -1."""
    end = len(buf)
    while True:
        pos = buf.rfind(b"}", 0, end)
        if pos < 0:
            return -1
        rest = buf[pos + 1:pos + 64].lstrip()
        if rest.startswith(b","):
            return pos
        end = pos


def _group_structs(grouper: Grouper, ads: list, n: int, now: float) -> None:
    if not ads:
        return
    names = [f"a{i}" for i in range(n)]
    getkey = operator.attrgetter(*names) if n > 1 else (lambda ad, _n=names[0]: (getattr(ad, _n),))
    if ads[0].JobCount is not None or ads[-1].JobCount is not None:  # aggregate ads: few, the generic path
        grouper.add_ads(({**dict(zip(grouper.attrs, getkey(ad))), **_present(ad)} for ad in ads), now)
        return
    cutoff = now - OLD_IDLE_SECONDS
    idle = [ad for ad in ads if ad.JobStatus == IDLE]
    running = [ad for ad in ads if ad.JobStatus == RUNNING] if len(idle) < len(ads) else []
    new = [ad for ad in idle if ad.QDate is None or ad.QDate > cutoff]
    old = [ad for ad in idle if ad.QDate is not None and ad.QDate <= cutoff] if len(new) * 2 > len(idle) else None
    counted = [_count_keys(getkey, jobs) for jobs in (idle, running, new if old is None else old)]
    for key, n_idle in counted[0].items():
        n_other = counted[2].get(key, 0)
        grouper.add(key, idle=n_idle, idle_old=n_idle - n_other if old is None else n_other)
    for key, n_running in counted[1].items():
        grouper.add(key, running=n_running)


def _count_keys(getkey: Callable, jobs: list) -> Counter:
    try:
        return Counter(map(getkey, jobs))
    except TypeError:  # an unhashable value (a list) in some job: key it by its text
        return Counter(tuple(classads._key(v) for v in getkey(ad)) for ad in jobs)


def _present(ad: Any) -> dict[str, Any]:
    return {k: v for k in ("JobStatus", "QDate", "JobCount") if (v := getattr(ad, k)) is not None}


# ---- matching and summary ---------------------------------------------------------------------


def matcher_for(config: Any, frontend: str) -> classads.Matcher:
    fe = config.frontend(frontend)
    entries = {e.name: e for e in config.entries}
    return classads.Matcher(
        fe.match_expr, {e: (entries[e].machine_attrs(), entries[e].requirements) for e in fe.entries}
    )


def match_groups(groups: list[JobGroup], matcher: classads.Matcher) -> None:
    for group in groups:
        group.size = classads.job_size(group.attrs)
        group.entries = matcher.matches(group.attrs, group.size)


def frontend_demand(
    config: Any, frontend: str, pool: Any, log: Any, now: float | None = None,
) -> tuple[list[JobGroup], list[dict[str, str]], classads.Matcher]:
    """A frontend's demand from its source, each group matched against its entries.

    Returns the groups, the schedds that did not answer, and the matcher (for its counters).
    """
    fe = config.frontend(frontend)
    attrs = match_attributes(fe.match_expr, [config.entry(e) for e in fe.entries])
    groups, missing = collect(fe.demand, attrs, pool, log, now)
    matcher = matcher_for(config, frontend)
    match_groups(groups, matcher)
    return groups, missing, matcher


def summarize(groups: list[JobGroup]) -> dict[str, Any]:
    return {
        "groups": len(groups),
        "idle": sum(g.idle for g in groups),
        "running": sum(g.running for g in groups),
        "idle_unmatched": sum(g.idle for g in groups if not g.entries),
    }


# ---- the schedd source ------------------------------------------------------------------------


def collect(
    source: Any,
    attrs: list[str],
    pool: Any,
    log: Any,
    now: float | None = None,
) -> tuple[list[JobGroup], list[dict[str, str]]]:
    """Demand from a frontend's source; a schedd that fails or times out is logged, skipped and reported.

    ``pool`` offers ``schedd_names(names)`` and ``query_demand(schedd,
    constraint, attrs, old_before)`` (HTCondorHook in production), the latter
    returning job or aggregate ads as dicts. Schedds are asked in parallel,
    each in a process of its own, all within ``source.timeout`` seconds: the
    htcondor2 bindings hold the GIL while they wait on a socket (about 20 s
    for a schedd that accepts and never answers), so a thread could not
    keep the timeout; a process can be killed. Each process groups its
    schedd's ads and sends back only the counts.
    """
    now = time.time() if now is None else now
    if source.queue_file:
        return read_queue_file(source.queue_file, attrs, now), []
    timeout = float(source.timeout)
    ok, names = run_isolated({"collector": lambda: pool.schedd_names(list(source.schedds))}, timeout)["collector"]
    if not ok:
        raise RuntimeError(f"the collector did not list the schedds: {names}")
    constraint = f"({source.constraint}) && (JobStatus == {IDLE} || JobStatus == {RUNNING})"
    old_before = int(now - OLD_IDLE_SECONDS)

    def counted(name: str) -> dict[str, Any]:
        result = pool.query_demand(name, constraint, attrs, old_before)
        g = Grouper(attrs)
        g.add_ads(result["ads"], now)
        g.add_ads(result.get("old", []), now, old_only=True)
        return {"mode": result.get("mode", "jobs"), "ads": len(result["ads"]), "note": result.get("note"),
                "counts": g.counts}

    answers = run_isolated({n: (lambda n=n: counted(n)) for n in names}, timeout)
    grouper = Grouper(attrs)
    missing: list[dict[str, str]] = []
    for name in names:
        ok, result = answers[name]
        if not ok:  # one schedd down must not stop the cycle
            log.warning("Schedd %s did not answer (%s); planning without it", name, result)
            missing.append({"schedd": name, "error": str(result)[:300]})
            continue
        for key, (idle, running, old) in result["counts"].items():
            grouper.add(key, idle, running, old)
        log.info("Schedd %s: %d ads (%s)%s", name, result["ads"], result["mode"],
                 f"; {result['note']}" if result.get("note") else "")
    if names and len(missing) == len(names):
        raise RuntimeError(f"no schedd answered ({', '.join(m['schedd'] for m in missing)})")
    return grouper.groups(), missing


def run_isolated(calls: Mapping[str, Callable[[], Any]], timeout: float) -> dict[str, tuple[bool, Any]]:
    """Run each call in a forked child, all in parallel; (True, result) or (False, reason) each.

    A child that has not answered within ``timeout`` seconds is killed.
    Forked, so the child inherits the caller's state (configuration, the
    bindings as loaded); results travel back pickled through a pipe.
    """
    ctx = multiprocessing.get_context("fork")
    started = {}
    # A Celery worker's pool process, and the task process Airflow forks from it, is marked daemonic,
    # and multiprocessing then refuses to start children. Ours are killed and joined below, so the
    # mark's purpose (no orphans) holds: lift it while they start.
    me = multiprocessing.current_process()
    daemonic = me._config.pop("daemon", None)
    try:
        for name, fn in calls.items():
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(fn, writer), daemon=True, name=f"glidein-query-{name}")
            proc.start()
            writer.close()
            started[name] = (proc, reader)
    finally:
        if daemonic is not None:
            me._config["daemon"] = daemonic
    pending = {reader: name for name, (_, reader) in started.items()}
    results: dict[str, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout
    while pending and (left := deadline - time.monotonic()) > 0:
        for reader in mp_connection.wait(list(pending), left):
            name = pending.pop(reader)
            try:
                status, value = reader.recv()
            except EOFError:
                status, value = "error", "the query process ended without an answer"
            results[name] = (status == "ok", value)
    for name in pending.values():
        results[name] = (False, f"no answer within the {timeout:g} s timeout")
    for proc, reader in started.values():
        if proc.is_alive():
            proc.kill()
        proc.join(5)
        reader.close()
    return results


def _child(fn: Callable[[], Any], writer: Any) -> None:
    try:
        answer = ("ok", fn())
    except BaseException as exc:  # noqa: BLE001  reported to the parent, which names the schedd
        answer = ("error", f"{type(exc).__name__}: {exc}")
    writer.send(answer)
    writer.close()
