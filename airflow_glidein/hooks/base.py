"""The small interface every middleware hook implements, and what they share.

A middleware hook knows three calls: create n instances for a launch, list
ours (by the factory/entry/launch tags), terminate (and its stronger
variant). What all middlewares need is here, once:

- retry safety: a launch first looks for instances already made under its
  launch id (listed, or recorded at create: listings lag) and creates only
  what is missing, so a retried task (or a provider that ignores idempotency
  tokens) never starts a duplicate pilot; a create call whose answer never
  came is not repeated until the listing can have caught up with it;
- the API budget: every provider call takes a token of the endpoint's
  budget (``airflow_glidein.budget``) and, when the provider throttles
  (429/503 or its own equivalent), backs off with full jitter and tries again;
- verified termination: terminate, check the listing, terminate again, then
  force (force-delete, terminate-hard, remove-x), and report what still stays.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from abc import abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any, ClassVar, Protocol, TypeVar

from airflow.sdk import BaseHook

from airflow_glidein import budget as B
from airflow_glidein import metrics, middlewares
from airflow_glidein import pilots as P
from airflow_glidein.config import Entry

T = TypeVar("T")
Refusals = dict[str, str]  # instance id -> why the provider refused to act on it now

log = logging.getLogger(__name__)

CLIENT_TTL = 900.0  # s a provider client is shared within one process
_clients: dict[tuple, tuple[float, Any]] = {}


def conn_fingerprint(conn_id: str) -> str:
    """A digest of an Airflow connection's whole content: a rotated secret makes a new client."""
    c = BaseHook.get_connection(conn_id)
    body = json.dumps([c.conn_type, c.host, c.login, c.password, c.schema, c.port, c.extra], default=str)
    return hashlib.sha256(body.encode()).hexdigest()


def shared_client(key: tuple, build: Callable[[], T]) -> T:
    """One provider client per process for the same key (connection content, region, endpoint).

    Clients are costly to build (boto3 loads its service models, openstacksdk
    logs in and discovers), and a factory task builds a hook per entry and batch.
    """
    now = time.monotonic()
    hit = _clients.get(key)
    if hit is not None and now - hit[0] < CLIENT_TTL:
        return hit[1]
    client = build()
    _clients[key] = (now, client)
    return client


@dataclass
class LaunchSpec:
    launch_id: str
    frontend: str
    count: int
    image: str
    userdata: str
    request: str = ""
    extra_tags: dict[str, str] = field(default_factory=dict)


@dataclass
class TerminationReport:
    """What a verified termination achieved: gone, and what still stays (with why)."""

    gone: list[str] = field(default_factory=list)
    stuck: dict[str, str] = field(default_factory=dict)
    steps: list[str] = field(default_factory=list)  # the ladder as it ran, for the log

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe_error(exc: BaseException, limit: int = 400) -> str:
    """A provider error in one line for an ERROR message: the call and the provider's own words.

    botocore already says "An error occurred (Code) when calling the X operation: message";
    openstacksdk and pyone name the request and the server's message.
    """
    text = " ".join(str(exc).split()) or repr(exc)
    return f"{type(exc).__name__}: {text[:limit]}"


def backoff(attempt: int, hint: float, base: float, cap: float) -> float:
    """Full-jitter exponential backoff, never shorter than the provider's Retry-After."""
    return max(hint, random.uniform(0, min(cap, base * 2**attempt)))


# errors raised before a request reached the provider (botocore, urllib3, requests): nothing was made
NOT_SENT = {"EndpointConnectionError", "ConnectTimeoutError", "NewConnectionError", "ConnectTimeout"}


class Throttled(RuntimeError):
    """The provider kept throttling through every backoff this task may spend."""

    def __init__(self, endpoint: str, what: str, retries: int, hint: float, outcome: Any) -> None:
        wait = max(hint, 60.0)
        at = time.strftime("%H:%M:%S UTC", time.gmtime(B.CLOCK.time() + wait))
        detail = describe_error(outcome) if isinstance(outcome, BaseException) else str(outcome)[:200]
        super().__init__(f"{what} at {endpoint} still throttled after {retries} backoffs; the provider "
                         f"{'asks to wait ' + format(hint, '.0f') + ' s' if hint else 'gave no Retry-After'}: "
                         f"expect capacity after about {at} ({detail})")
        self.hint = hint


class LaunchPending(RuntimeError):
    """An earlier create call of this launch has no known outcome and the listing may still lag behind it."""


class LaunchLog(Protocol):
    """Where a launch records what it made, at once (``pilotdb.LaunchLog`` in the state store)."""

    now: float

    def known(self) -> set[str]: ...
    def last_call(self) -> dict[str, Any] | None: ...
    def calling(self, expected: int) -> None: ...
    def created(self, ids: Iterable[str], launched: float | None = None) -> None: ...
    def called(self, outcome: str) -> None: ...
    def marking(self, kind: str, name: str, tags: dict[str, str], now: float) -> None: ...


class PilotHook(BaseHook):
    """Base of the middleware hooks. Subclasses set ``middleware`` and the ``_`` methods."""

    middleware: ClassVar[str]
    throttle_retries: ClassVar[int] = 6  # backoffs on throttling before the call fails
    backoff_base: ClassVar[float] = 2.0  # s; doubles per attempt, with full jitter
    backoff_cap: ClassVar[float] = 60.0
    terminate_settle: ClassVar[float] = 10.0  # s a termination may take before it is checked

    def __init__(self, entry: Entry, factory: str, conn_id: str, **kwargs: Any) -> None:
        super().__init__()
        self.entry = entry
        self.factory = factory
        self.conn_id = conn_id
        self._log: LaunchLog | None = None  # set while a launch's create calls run
        self._have = self._sent = 0  # instances the launch had, and asked for so far in this launch

    # -- what each middleware implements ---------------------------------
    @abstractmethod
    def _list(self, launch_id: str | None = None) -> list[P.ProviderInstance]:
        """Our live instances at this entry (optionally of one launch)."""

    @abstractmethod
    def _create(self, spec: LaunchSpec, count: int, tags: dict[str, str]) -> list[P.ProviderInstance]:
        """Start ``count`` instances tagged with ``tags``, in as few calls as the API allows."""

    @abstractmethod
    def _terminate(self, ids: list[str]) -> Refusals | None:
        """Ask the provider to terminate these instances (best effort over all; already gone is fine).

        Returns the ones the provider refused to act on now, with its reason.
        """

    def _force_terminate(self, ids: list[str]) -> Refusals | None:
        """The middleware's stronger variant (force-delete, terminate-hard); default: terminate again."""
        return self._terminate(ids)

    def _needs_force(self, inst: P.ProviderInstance) -> bool:
        """True if only the forced variant can end this instance now (e.g. Nova's SOFT_DELETED)."""
        return False

    def _throttled(self, outcome: Any) -> float | None:
        """If this result or exception means "slow down": the seconds the provider asks (0: unsaid)."""
        return None

    def _refused(self, exc: Exception) -> bool:
        """True if this create error means the provider made nothing (a 4xx refusal: bad image, quota;
        a connection never made); False where the call may have made instances before it failed
        (timeouts, 5xx, a lost answer)."""
        return isinstance(exc, ConnectionRefusedError) or type(exc).__name__ in NOT_SENT

    def idempotent_create(self) -> bool:
        """True where repeating a create call with the same launch is safe (EC2 ClientToken on AWS)."""
        return False

    def _sending(self, n: int) -> None:
        """A middleware that makes one create call per instance (OpenNebula) calls this before each:
        an unanswered call then stands for the instances sent so far, not for the whole batch."""
        if self._log is not None:
            self._sent += n
            self._log.calling(self._have + self._sent)

    def _created(self, instances: Iterable[P.ProviderInstance]) -> None:
        """Each middleware's _create calls this as soon as a provider call returns ids: recorded at once."""
        if self._log is not None:
            ids = [i.id for i in instances]
            if ids:
                self._log.created(ids)

    # -- the API budget ---------------------------------------------------
    @cached_property
    def budget(self) -> B.ApiBudget:
        return B.ApiBudget.for_entry(self.entry)

    def api_call(self, send: Callable[[], T], what: str = "call", charge: bool = True) -> T:
        """One provider call through the budget, backing off while the provider throttles.

        ``charge=False`` when the transport already takes a token per request
        (EC2's before-send event), so a call is never counted twice.
        """
        for attempt in range(self.throttle_retries + 1):
            if charge:
                self.budget.acquire()
            try:
                outcome: Any = send()
                failed = False
            except Exception as exc:
                outcome, failed = exc, True
            hint = self._throttled(outcome)
            if hint is None:
                if failed:
                    raise outcome
                return outcome
            if attempt == self.throttle_retries:
                raise Throttled(self.entry.api_endpoint, what, attempt, hint, outcome)
            metrics.incr(1, "api", "throttled", self.entry.api_endpoint, endpoint=self.entry.api_endpoint)
            pause = backoff(attempt, hint, self.backoff_base, self.backoff_cap)
            log.warning("%s %s throttled by %s; retry %d of %d in %.1f s", self.middleware, what,
                        self.entry.api_endpoint, attempt + 1, self.throttle_retries, pause)
            B.CLOCK.sleep(pause)
        raise AssertionError("unreachable")

    # -- shared behaviour -------------------------------------------------
    def tags(self, spec: LaunchSpec) -> dict[str, str]:
        return {
            P.TAG_FACTORY: self.factory,
            P.TAG_FRONTEND: spec.frontend,
            P.TAG_ENTRY: self.entry.name,
            P.TAG_LAUNCH: spec.launch_id,
            P.TAG_REQUEST: spec.request,
            **spec.extra_tags,
        }

    def listing_scope(self) -> tuple:
        """Entries whose hooks (with one connection) give the same scope are listed together by ``_list_all``."""
        return ("entry", self.entry.name)

    def _list_all(self) -> list[P.ProviderInstance] | None:
        """Our pilots of every entry this connection reaches at this endpoint, in one listing pass.

        None where the middleware cannot (the inventory then lists entry by
        entry). Cloud Scheduler's lesson: one listing per credential and cloud
        per poll, not per entry or VM.
        """
        return None

    def list_pilots(self) -> list[P.ProviderInstance]:
        """Our pilots at this entry. Listing never acts on them: whoever lists (the inventory, a sensor,
        the bootstrap service for a token holder) changes nothing at the provider."""
        return self._list()

    def sanitize(self, instances: list[P.ProviderInstance]) -> list[P.ProviderInstance]:
        """The inventory's upkeep of this entry's listed pilots, and the listing as it stands after it
        (glideinWMS's sanitizeGlideins: held grid jobs are released or removed). Only the factory's
        inventory calls it, once per cycle, on the entry's own listing; default: nothing to do."""
        return instances

    def list_launch(self, launch_id: str) -> list[P.ProviderInstance]:
        """Our live instances of one launch (the provider filters by the launch tag where it can)."""
        return self._list(launch_id)

    def list_endpoint(self) -> list[P.ProviderInstance] | None:
        return self._list_all()

    def launch(self, spec: LaunchSpec, record: LaunchLog | None = None) -> dict[str, list[str]]:
        """Idempotent: returns {"existing": ids, "created": ids} for the launch id.

        What the launch already has is what the provider shows under its id
        (ended instances too, where it still shows them: a pilot that already
        came and went is not made again) plus what ``record`` recorded at
        create (a listing lags behind a create).
        If an earlier create call has no known outcome and the listing holds
        less than it asked for, it may yet show up: nothing is created until
        the entry's ``listing_grace`` has passed (``LaunchPending``), except
        where the provider makes a repeated call idempotent.
        """
        listed = {i.id for i in self._made(spec.launch_id)}  # ended ones too: a pilot that came and went
        known = listed | (record.known() if record is not None else set())
        have = self._settle(spec, record, known) if record is not None else len(known)
        missing = spec.count - have
        if missing <= 0:
            log.info("Launch %s already has %d of %d instances (%d listed, %d known); creating none",
                     spec.launch_id, have, spec.count, len(listed), len(known))
            return {"existing": sorted(known), "created": []}
        if record is not None:
            record.calling(have + missing)
        self._log, self._have, self._sent = record, have, 0
        try:
            made = self._create(spec, missing, self.tags(spec))
        except Exception as exc:
            if record is not None:
                record.called("refused" if self._refused(exc) else "unknown")
            raise
        finally:
            self._log = None
        created = [i.id for i in made if i.id not in known]
        if record is not None:
            record.created(created)  # those a middleware did not record as it went
            record.called("made")
        return {"existing": sorted(known), "created": created}

    def _settle(self, spec: LaunchSpec, record: LaunchLog, known: set[str]) -> int:
        """How many instances the launch has: the ids known, or, within the entry's listing_grace, what
        its last create call made (a batch call may name only its first instance, the listing lags).

        While an earlier call's outcome is unknown and fewer than it asked for are known, nothing is
        created (``LaunchPending``), except where the provider makes a repeated call idempotent.
        """
        last = record.last_call()
        if last is None or last["outcome"] in ("refused", "settled") or len(known) >= last["expected"]:
            return len(known)
        waited = record.now - last["started"]
        grace = self.entry.listing_grace
        if waited >= grace:
            return len(known)  # the listing has caught up: what it shows is what there is
        if last["outcome"] == "made":
            return last["expected"]
        if self.idempotent_create():
            return len(known)
        raise LaunchPending(
            f"launch {spec.launch_id} at {self.entry.name}: an earlier create call ({int(waited)} s ago) has no "
            f"known outcome and {len(known)} of its {last['expected']} instances are listed; listings lag, so "
            f"nothing is created again before listing_grace ({grace} s) has passed")

    def _made(self, launch_id: str) -> list[P.ProviderInstance]:
        """Every instance the launch id made that the provider still shows, ended ones included: a
        retried launch whose first try's pilot already came and went must not make it again.
        Default: the live ones (a provider that forgets ended instances cannot say more)."""
        return self._list(launch_id)

    def terminate(self, ids: list[str], force: bool = False) -> Refusals:
        """One termination request for ``ids`` (``force``: the stronger variant); returns refusals."""
        if not ids:
            return {}
        return (self._force_terminate if force else self._terminate)(list(ids)) or {}

    def quota_scope(self) -> tuple:
        """Entries whose hooks (with one connection) give the same scope share one quota."""
        return self.listing_scope()

    def quota(self) -> dict[str, int] | None:
        """What the provider still lets this connection start at this endpoint: {"instances", "cores",
        "memory_mb"}, each present only where the provider sets a limit; None where it cannot say
        (Cloud Scheduler's lesson: plan within the headroom instead of failing launches against it)."""
        return None

    def preflight(self) -> list[tuple[str, bool, str]]:
        """(what, ok, detail) checks before the first launch: the provider answers, its quota headroom,
        and the middleware's ``entry_checks`` (``python -m airflow_glidein preflight``)."""
        ok, detail = self.test_connection()
        if not ok:
            return [("provider answers", ok, detail)]
        checks = [("quota headroom", self._headroom), *self.entry_checks()]
        return [("provider answers", ok, detail), *(self.probe(what, check) for what, check in checks)]

    def entry_checks(self) -> list[tuple[str, Callable[[], tuple[bool, str]]]]:
        """(what, check) pairs saying whether the entry's image, flavor or template exist at the provider."""
        return []

    def _headroom(self) -> tuple[bool, str]:
        from airflow_glidein.provisioning import pilots_within

        q = self.quota()
        if q is None:
            return True, "the provider does not say"
        if not q:
            return True, "no limit set"
        fits = pilots_within(q, self.entry)
        return fits > 0, f"{', '.join(f'{k} {v}' for k, v in q.items())} left: room for {fits} pilots"

    @staticmethod
    def probe(what: str, check: Callable[[], tuple[bool, str]]) -> tuple[str, bool, str]:
        """One preflight check; its failure is a result, not an exception."""
        try:
            ok, detail = check()
        except Exception as exc:
            return what, False, f"{type(exc).__name__}: {str(exc)[:300]}"
        return what, ok, detail

    def cores_fit(self, cores: int, memory_mb: int | None) -> tuple[bool, str]:
        """The flavor against what the entry says a pilot has: planning counts the entry's numbers."""
        e = self.entry
        size = f"{cores} cores, {memory_mb} MB" if memory_mb is not None else f"{cores} cores"
        if cores < e.cores or (memory_mb is not None and e.memory_mb and memory_mb < e.memory_mb):
            return False, f"{size}: less than the entry's {e.cores} cores, {e.memory_mb} MB that planning counts"
        return True, size

    def still_there(self, ids: list[str]) -> dict[str, P.ProviderInstance]:
        """Which of ``ids`` the provider still lists (any state but terminated): one listing."""
        wanted = set(ids)
        return {i.id: i for i in self._list() if i.id in wanted and i.state != P.P_TERMINATED}

    def terminate_verified(self, ids: list[str], settle: float | None = None) -> TerminationReport:
        """Terminate, verify, terminate again, then force; report what still stays.

        Each step waits ``settle`` seconds (entry option ``terminate_settle``)
        and checks with one listing, so a termination in progress is not
        forced early and the calls stay few. What stays after the forced step
        is reported as stuck with its provider state: the caller keeps it on
        record (never dropped) and tries again next cycle.
        """
        settle = float(self.entry.options.get("terminate_settle", self.terminate_settle) if settle is None else settle)
        report = TerminationReport()
        left = list(dict.fromkeys(ids))
        refused: Refusals = {}
        only_force: set[str] = set()  # e.g. soft-deleted: asking again cannot help
        for step, force in (("terminate", False), ("terminate again", False), ("force", True)):
            if not left:
                break
            batch = left if force else [i for i in left if i not in only_force]
            refused.update(self.terminate(batch, force=force))
            report.steps.append(f"{step}: {len(batch)}")
            B.CLOCK.sleep(settle)
            there = self.still_there(left)
            report.gone += [i for i in left if i not in there]
            left = [i for i in left if i in there]
            only_force = {i for i in left if self._needs_force(there[i])}
            for iid in left:
                inst = there[iid]
                why = refused.get(iid) or inst.detail
                report.stuck[iid] = f"{inst.state}" + (f": {why}" if why else "")
        report.stuck = {i: report.stuck[i] for i in left}
        if left:
            log.warning("%s at %s: %d still there after terminate, terminate again and force: %s",
                        self.middleware, self.entry.name, len(left), report.stuck)
        return report


def pilot_hook(entry: Entry, factory: str, conn_id: str, **kwargs: Any) -> PilotHook:
    """The hook for an entry's middleware, as its description names it (modules load only when used)."""
    return middlewares.get(entry.middleware).hook_class()(entry=entry, factory=factory, conn_id=conn_id, **kwargs)
