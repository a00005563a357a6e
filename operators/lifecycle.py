"""The factory's lifecycle operators: inventory, reaping, and the cycle's report.

Inventory joins each entry's provider listing (by our tags) with the
collector's startd ads (by GLIDEIN_PILOT_ID) into the pilot table (state
store), applying ``lifecycle.transition``. Reaping carries out
``lifecycle.reap``'s actions and remembers them, so the next cycle can
verify and escalate. XCom carries summaries; the table holds the pilots.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowException, AirflowFailException

from airflow_glidein import lifecycle as L
from airflow_glidein import history, metrics, middlewares, pilotdb, provisioning, report, state
from airflow_glidein import pilots as P
from airflow_glidein.assets import GLIDEIN_STATUS
from airflow_glidein.bootstrap import upkeep
from airflow_glidein.config import Config, Entry
from airflow_glidein.credentials import usable_on
from airflow_glidein.hooks import pilot_hook
from airflow_glidein.hooks.base import describe_error
from airflow_glidein.hooks.htcondor import HTCondorHook
from airflow_glidein.operators.base import GlideinBaseOperator

if TYPE_CHECKING:
    from airflow.sdk import Context

STARTD_ATTRS = ["GLIDEIN_PILOT_ID", "GLIDEIN_Entry_Name", "State", "Activity", "EnteredCurrentState",
                "Name", "MyAddress", "MyType"]
STARTD_KEEP = ("Name", "State", "Activity", "EnteredCurrentState")  # what the pilot table keeps


def provision_conns(config: Config, entry: Entry) -> list[str]:
    """Connection ids of every provisioning credential usable on the entry."""
    return sorted({c.conn_id for c in config.credentials if c.purpose == "provision" and usable_on(c, entry)})


def as_pilot(row: dict[str, Any], state: str | None = None) -> P.Pilot:
    return P.Pilot(row["id"], row["entry"], row.get("frontend"), row.get("launch"), state or row["state"],
                   row["launched"], row.get("provider_state") or "", burst=row.get("burst"), started=row.get("started"))


def pilot_counts(rows: Any) -> dict[str, dict[str, dict[str, int]]]:
    return P.counts(as_pilot(r) for r in rows)


def removed_entries(config: Config, store: state.StateStore, mine: list[Entry] | None = None) -> dict[str, Entry]:
    """Entries no longer configured that still have pilots on record, with their last settings.

    Each is handled by the task group of its last API endpoint, or, when no
    configured entry calls that endpoint any more, by the first group (by
    endpoint name), so exactly one inventory lists it. ``mine``: the entries
    of one group (None: all).
    """
    configured = {e.name for e in config.entries}
    names = pilotdb.stranded(store, configured)
    if not names:
        return {}
    endpoints = sorted(config.endpoints())
    here = {e.api_endpoint for e in (mine if mine is not None else config.entries)}
    out = {}
    for name, snap in pilotdb.load_snapshots(store, names).items():
        entry = Entry.model_validate(snap["config"])
        owner = entry.api_endpoint if entry.api_endpoint in endpoints else endpoints[0]
        if mine is None or owner in here:
            out[name] = entry
    return out


def entry_of(config: Config, name: str) -> Entry:
    """A configured entry, or the last settings of one taken out of the configuration."""
    try:
        return config.entry(name)
    except StopIteration:
        snap = pilotdb.load_snapshots(state.store(), [name]).get(name)
        if snap is None:
            raise KeyError(f"entry {name!r} is neither configured nor remembered") from None
        return Entry.model_validate(snap["config"])


def joined(startds: dict[str, dict] | None, entry: str, inst: P.ProviderInstance) -> dict | None:
    """The startd ad of a listed pilot: by its key, or by an alias it may have claimed (an EC2 GAHP job's
    instance id)."""
    if startds is None:
        return None
    for pid in (inst.id, *inst.aliases):
        if P.pilot_key(entry, pid) in startds:
            return startds[P.pilot_key(entry, pid)]
    return None


def tag_policy(tags: dict[str, str]) -> dict[str, int] | None:
    """A pilot's own policy carried in its tags (bursts set theirs), for reaping."""
    out = {}
    for field, tag in (("max_lifetime", P.TAG_MAX_LIFETIME), ("idle_timeout", P.TAG_IDLE_TIMEOUT)):
        try:
            out[field] = int(tags[tag])
        except (KeyError, ValueError):
            continue
    return out or None


class InventoryOperator(GlideinBaseOperator):
    """Our pilots at the given entries (default: all), their states, into the pilot table.

    Entries reached with one connection and one listing scope (an EC2 region,
    an OpenNebula user's pool) are listed in one pass. Returns counts and
    per-entry listing errors; an entry that could not be listed keeps its
    remembered pilots untouched (and the run's report turns the run red).

    A pilot is (entry, provider id). Created ids are recorded at launch: one
    not listed yet stays ``requested`` (capacity) for the entry's
    ``listing_grace``. Pilots of an entry taken out of the configuration, or
    made with a credential no longer configured, are still listed through the
    last connection that saw them, with the entry's last settings, and
    drained as orphans until none is left.
    """

    template_fields: Sequence[str] = ("entries", "config_file")

    def __init__(self, *, entries: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.entries = entries

    def execute(self, context: Context) -> dict[str, Any]:
        cfg, now, store = self.config, self.now(), state.store()
        mine = [cfg.entry(n) for n in self.entries] if self.entries else list(cfg.entries)
        pilotdb.save_snapshots(store, {e.name: e.model_dump_json() for e in mine}, now)
        removed = removed_entries(cfg, store, mine)
        everywhere = mine + list(removed.values())
        frontends = {f.name for f in cfg.frontends}
        startds = self._startds()
        remembered = pilotdb.load_pilots(store, [e.name for e in everywhere])
        listed, errors = self._listings(everywhere, remembered, set(removed))
        for name in set(listed) - {e.name for e in everywhere}:  # removed entries first seen in a scope's listing
            removed[name] = entry_of(cfg, name)
            everywhere.append(removed[name])
        quotas = self._quotas(mine)
        rows: list[dict[str, Any]] = []
        for entry in everywhere:
            current = set(provision_conns(cfg, entry)) if entry.name not in removed else set()
            for iid, (inst, conn_id) in listed.get(entry.name, {}).items():
                key = P.pilot_key(entry.name, iid)
                prev = remembered.pop(key, None)
                frontend = inst.tags.get(P.TAG_FRONTEND)
                startd = joined(startds, entry.name, inst)
                gone_from_config = (f"entry {entry.name!r} is no longer configured" if entry.name in removed else
                                    f"its connection {conn_id!r} is no longer a provisioning credential of the entry"
                                    if conn_id not in current else "")
                obs = L.Observation(inst.state, inst.launched, known=frontend in frontends and not gone_from_config,
                                    startd=startd, collector=startds is not None, started=inst.started)
                policy = cfg.policy_for(entry, frontend)
                queue_timeout = policy.queue_timeout if middlewares.get(entry.middleware).queued else None
                st, mem = L.transition(L.Memory.from_dict(prev and prev["memory"]), obs, now, policy.boot_timeout,
                                       policy.terminate_deadline, queue_timeout)
                rows.append({
                    "id": iid, "entry": entry.name, "frontend": frontend, "burst": inst.tags.get(P.TAG_BURST),
                    "policy": tag_policy(inst.tags), "launch": inst.launch_id,
                    "request": inst.tags.get(P.TAG_REQUEST), "factory_run": inst.tags.get(P.TAG_FACTORY_RUN),
                    "launched": inst.launched or (prev or {}).get("launched") or now, "started": inst.started,
                    "alias": inst.aliases[0] if inst.aliases else None, "state": st,
                    "provider_state": inst.state, "conn": conn_id,
                    "detail": "; ".join(filter(None, [gone_from_config, inst.detail])),
                    "startd": {k: startd[k] for k in STARTD_KEEP if k in startd} if startd else None,
                    "memory": mem.to_dict(), "updated": now, "_prev": prev and prev["state"],
                })
        # Remembered pilots missing from a good listing are gone (terminated, verified), except those
        # recorded at create that the listing may not show yet.
        entries = {e.name: e for e in everywhere}
        waiting, gone = [], []
        for key, row in remembered.items():
            if row["entry"] in errors:
                continue
            if row["state"] == P.REQUESTED and now - row["launched"] < entries[row["entry"]].listing_grace:
                waiting.append(row)
            else:
                gone.append(key)
                if row["state"] == P.REQUESTED:
                    self.log.warning("Entry %s: %s was created by launch %s but never listed within listing_grace "
                                     "(%d s); dropped", row["entry"], row["id"], row["launch"],
                                     entries[row["entry"]].listing_grace)
        pilotdb.delete_pilots(store, gone)
        pilotdb.save_pilots(store, rows)
        done = [name for name in removed if name not in errors and not any(r["entry"] == name for r in rows)]
        if done:
            self.log.info("No pilot of removed entries %s is left: no longer listed", done)
            pilotdb.drop_snapshots(store, done)
        for entry in everywhere:  # a cleared run's earlier listing failure is forgotten once it lists
            if entry.name in errors:
                pilotdb.record_failure(store, context["run_id"], entry.name, "listing", errors[entry.name], now)
            else:
                pilotdb.clear_failure(store, context["run_id"], entry.name, "listing")
        self._entry_health(store, rows, now)
        counts = pilot_counts(rows + waiting)
        self.log.info("Pilots per entry and state:\n%s", report.pilots_table(counts))
        if waiting:
            self.log.info("%d created pilots are not listed yet (listing lag), counted as requested: %s",
                          len(waiting), sorted(P.pilot_key(r["entry"], r["id"]) for r in waiting)[:20])
        if gone:
            self.log.info("%d pilots left their provider since the last cycle: %s", len(gone), sorted(gone)[:20])
        return {"counts": counts, "errors": errors, "collector": startds is not None, "gone": len(gone),
                "quotas": quotas, "removed": sorted(removed)}

    def _quotas(self, entries: list[Entry]) -> list[dict[str, Any]]:
        """The provider's headroom per quota scope (a project at an endpoint): one call each, where the
        middleware can say. Only entries with a single provisioning connection are bound by it (the
        factory cannot know which of several a frontend will pick). A failure leaves it unknown."""
        cfg = self.config
        scopes: dict[tuple, tuple[Any, list[str]]] = {}
        for entry in entries:
            conns = provision_conns(cfg, entry)
            if len(conns) == 1:
                hook = pilot_hook(entry, cfg.factory.name, conns[0])
                scopes.setdefault((conns[0], hook.quota_scope()), (hook, []))[1].append(entry.name)
        out = []
        for (conn_id, _), (hook, names) in scopes.items():
            try:
                headroom = hook.quota()
            except Exception as exc:
                self.log.warning("Entries %s: reading the provider quota with %s failed, launches are not "
                                 "bound by it this cycle: %s", names, conn_id, exc)
                continue
            if headroom:
                self.log.info("Entries %s: provider headroom %s", names, headroom)
                out.append({"entries": names, "headroom": headroom})
        return out

    def _listings(self, entries: list[Entry], remembered: dict[str, dict],
                  removed: set[str]) -> tuple[dict[str, dict], dict[str, str]]:
        """{entry: {id: (instance, connection)}} and {entry: error}, in as few listings as the APIs allow.

        Each entry is listed with its provisioning connections and with any
        other connection its remembered pilots were seen through (a
        credential taken out of the configuration). Where one pass lists a
        whole scope (an EC2 region, an OpenNebula user's pool), it also shows
        pilots of entries no longer configured: they keep their own entry
        name, and the entry's last settings come from the scope's first entry
        when none were kept.
        """
        cfg = self.config
        configured = {e.name for e in cfg.entries}
        seen_with: dict[str, set[str]] = {}
        for row in remembered.values():
            if row.get("conn"):
                seen_with.setdefault(row["entry"], set()).add(row["conn"])
        groups: dict[tuple, list[tuple[Entry, Any]]] = {}
        for entry in entries:
            current = set() if entry.name in removed else set(provision_conns(cfg, entry))
            for conn_id in sorted(current | seen_with.get(entry.name, set())):
                hook = pilot_hook(entry, cfg.factory.name, conn_id)
                groups.setdefault((conn_id, hook.listing_scope()), []).append((entry, hook))
        listed: dict[str, dict] = {e.name: {} for e in entries}
        errors: dict[str, str] = {}
        for (conn_id, _scope), members in groups.items():
            names = {e.name for e, _ in members}
            try:
                together = members[0][1].list_endpoint()
                if together is not None:
                    for inst in together:
                        tagged = inst.tags.get(P.TAG_ENTRY)
                        if tagged in names or (tagged and tagged not in configured):
                            if tagged not in listed:  # a removed entry first seen here: keep its scope's settings
                                listed[tagged] = {}
                                self._adopt(tagged, members[0][0])
                            listed[tagged].setdefault(inst.id, (inst, conn_id))
                    continue
                for entry, hook in members:
                    # held grid jobs are released or removed here, by the inventory only (never by a reader)
                    for inst in hook.sanitize(hook.list_pilots()):
                        listed[entry.name].setdefault(inst.id, (inst, conn_id))
            except Exception as exc:  # one provider down must not stop the other entries
                self.log.error("Entries %s: listing with connection %s failed: %s", sorted(names), conn_id,
                               describe_error(exc))
                for name in names:
                    errors[name] = f"listing with connection {conn_id}: {describe_error(exc)}"
                    metrics.incr(1, "failures", name, "listing", entry=name, kind="listing")
        return listed, errors

    def _adopt(self, name: str, like: Entry) -> None:
        """Keep settings for a removed entry's pilots found in a scope-wide listing: the listing entry's."""
        store = state.store()
        if not pilotdb.load_snapshots(store, [name]):
            pilotdb.save_snapshots(store, {name: like.model_copy(update={"name": name}).model_dump_json()},
                                   self.now())

    def _startds(self) -> dict[str, dict] | None:
        collector = self.config.factory.collector
        if not collector:
            self.log.info("No collector configured: registration is not observed; pilots count as booting")
            return None
        ads = HTCondorHook(collector=collector).query_startds(
            f'GLIDEIN_Factory == "{self.config.factory.name}"', STARTD_ATTRS
        )
        return L.pilot_ads(ads)  # a pilot's slots, as one ad

    def _entry_health(self, store: state.StateStore, rows: list[dict], now: float) -> None:
        """Boot failures new this cycle back an entry off; a pilot registering clears it.

        A cycle with new failures counts once, however many pilots failed in
        it (cluster-autoscaler counts failed scale-ups, not nodes): a batch of
        ten dead pilots is one failure, not an hour's backoff at once.
        """
        health = pilotdb.load_health(store)
        new_failures = Counter(r["entry"] for r in rows if r["state"] == P.BOOT_FAILED and r["_prev"] != P.BOOT_FAILED)
        registered = {r["entry"] for r in rows if (r["memory"].get("first_registered") or -1) == now}
        changes = []
        for entry, n in new_failures.items():
            metrics.incr(n, "failures", entry, "boot", entry=entry, kind="boot")
        for entry in set(new_failures) | registered:
            failures = 0 if entry in registered else health.get(entry, {}).get("failures", 0) + 1
            reason = f"{new_failures[entry]} pilots failed to boot" if failures else ""
            changes.append({"entry": entry, "failures": failures, "until": L.backoff_until(failures, now),
                            "reason": reason, "updated": now})
            if failures:
                self.log.warning("Entry %s backed off after %d failures (%s)", entry, failures, reason)
        pilotdb.save_health(store, changes)


class ReapPilotsOperator(GlideinBaseOperator):
    """Carry out the cycle's reaping actions (terminate, force, retire) and remember them.

    Returns what was asked of the providers, per entry and connection, so the
    verify sensor can wait for it.
    """

    template_fields: Sequence[str] = ("actions", "entries", "config_file")

    def __init__(self, *, actions: Any, entries: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.actions = actions
        self.entries = entries  # only these entries' actions (one endpoint's); default all

    def execute(self, context: Context) -> list[dict[str, Any]]:
        cfg, now, store, run_id = self.config, self.now(), state.store(), context["run_id"]
        mine = None
        if self.entries:  # this endpoint's entries, and the removed entries this endpoint's group lists
            mine = set(self.entries) | set(removed_entries(cfg, store, [cfg.entry(n) for n in self.entries]))
        actions = [L.Action(**a) for a in self.actions or [] if mine is None or a["entry"] in mine]
        rows = pilotdb.load_pilots(store, sorted({a.entry for a in actions}))
        groups: dict[tuple[str, str, str], list[L.Action]] = {}
        for a in actions:
            row = rows.get(a.key)
            if row is None:
                continue
            if a.action == "retire" and (row.get("memory") or {}).get("retire_requested") is not None:
                continue  # asked already (this is a retry): once is enough
            groups.setdefault((a.entry, row["conn"], a.action), []).append(a)
        memory: dict[str, dict] = {}
        states: dict[str, str] = {}
        done, failed = [], []
        failed_entries: dict[str, str] = {}
        for (entry_name, conn_id, kind), items in sorted(groups.items()):
            ids = sorted(a.id for a in items)
            try:
                if kind == "retire":  # one startd that cannot be asked must not stop the others being remembered
                    refused = self._retire([rows[a.key] for a in items])
                    failed += [a for a in items if a.key in refused]
                    items = [a for a in items if a.key not in refused]
                else:
                    pilot_hook(entry_of(cfg, entry_name), cfg.factory.name, conn_id).terminate(
                        ids, force=kind == "force_terminate"
                    )
            except Exception as exc:
                self.log.error("Entry %s: %s of %d pilots failed: %s", entry_name, kind, len(ids), describe_error(exc))
                metrics.incr(1, "failures", entry_name, "terminate", entry=entry_name, kind="terminate")
                failed_entries[entry_name] = f"{kind} of {len(ids)} pilots with {conn_id}: {describe_error(exc)}"
                failed += items
                continue
            metrics.incr(len(items), "terminations", entry_name, kind, entry=entry_name, action=kind)
            for a in items:
                self.log.info("%s %s at %s: %s", kind, a.id, a.entry, a.reason)
                mem = rows[a.key].get("memory") or {}
                if kind == "retire":
                    memory[a.key] = {"retire_requested": now}
                    states[a.key] = P.RETIRING
                else:
                    memory[a.key] = {"terminate_requested": now,
                                     "terminate_attempts": int(mem.get("terminate_attempts", 0)) + 1,
                                     "terminate_reason": mem.get("terminate_reason") or a.reason}
                    states[a.key] = P.STUCK if rows[a.key]["state"] == P.STUCK else P.TERMINATING
            if kind != "retire":
                done.append({"entry": entry_name, "conn": conn_id, "ids": ids})
        pilotdb.update_memory(store, memory, now, states)
        for entry_name in {a.entry for a in actions} - set(failed_entries):
            pilotdb.clear_failure(store, run_id, entry_name, "terminate")
        for entry_name, message in failed_entries.items():
            pilotdb.record_failure(store, run_id, entry_name, "terminate", message, now)
        if failed:
            raise AirflowException(f"{len(failed)} reaping actions failed: {[f'{a.action} {a.key}' for a in failed][:20]}")
        return done

    def _retire(self, rows: list[dict]) -> dict[str, str]:
        """Ask each startd to shut down peacefully: running jobs finish, then the pilot exits.

        Returns the pilots whose startd could not be asked, with why.
        """
        hook = HTCondorHook(collector=self.config.factory.collector)
        refused = {}
        for row in rows:
            name = (row.get("startd") or {}).get("Name")
            key = P.pilot_key(row["entry"], row["id"])
            try:
                if not name:
                    raise AirflowException(f"pilot {key} has no startd to retire")
                hook.retire_startd(name)
            except Exception as exc:
                self.log.warning("Pilot %s: retiring startd %s failed: %s", key, name, exc)
                refused[key] = f"{type(exc).__name__}: {exc}"
        return refused


class FactoryReportOperator(GlideinBaseOperator):
    """Publish pilot counts (and backoff, stuck pilots) on ``glidein_status``; print the cycle's summary.

    Counts come from the pilot table (launches record what they create at
    once, so instances made before a failure are counted) and launches whose
    instances are not listed yet. Runs whatever its upstream did; if any
    listing, launch or termination of the run failed, ``check_cycle`` after it
    turns the run red.
    """

    template_fields: Sequence[str] = ("inventory", "actions", "decisions", "config_file")

    def __init__(self, *, inventory: Any, actions: Any, decisions: Any = None, **kwargs: Any) -> None:
        kwargs.setdefault("outlets", [GLIDEIN_STATUS])
        super().__init__(**kwargs)
        self.inventory = inventory
        self.actions = actions
        self.decisions = decisions

    def execute(self, context: Context) -> dict[str, Any]:
        cfg, now, store, run_id = self.config, self.now(), state.store(), context["run_id"]
        names = [e.name for e in cfg.entries] + list(removed_entries(cfg, store))
        rows = list(pilotdb.load_pilots(store, names).values())  # created instances are recorded at once
        launched = sum(r.get("factory_run") == run_id for r in rows)
        grace = max((e.listing_grace for e in cfg.entries), default=0)
        unlisted = provisioning.unlisted_pilots(pilotdb.unlisted_launches(store, names, now - grace), cfg, now)
        counts = P.counts([as_pilot(r) for r in rows] + unlisted)
        history.record_factory(counts, now, store)  # the Pilots page's charts
        backoff = {e: {"until": h["until"], "failures": h["failures"], "reason": h["reason"]}
                   for e, h in pilotdb.load_health(store).items() if h["until"] > now}
        stuck = sorted(P.pilot_key(r["entry"], r["id"]) for r in rows if r["state"] == P.STUCK)
        actions = self.actions or []
        failed = pilotdb.failures(store, run_id)
        status = {
            "factory": cfg.factory.name,
            "pilots": counts,
            "launched": launched,
            "actions": dict(Counter(a["action"] for a in actions)),
            "stuck": stuck,
            "backoff": backoff,
            "errors": merged_errors(self.inventory),
            "failures": [{k: f[k] for k in ("entry", "call", "message")} for f in failed],
            "decisions": self.decisions or {},
            "run_id": run_id,
        }
        context["outlet_events"][GLIDEIN_STATUS].extra = status
        metrics.pilots(counts, P.STATES)
        upkeep.prune(store)  # expired bootstrap tokens, used-up launches, old pilot logs
        lines = [f"Factory {cfg.factory.name}: {launched} launched, "
                 + ", ".join(f"{n} {k}" for k, n in sorted(status["actions"].items())) if actions else
                 f"Factory {cfg.factory.name}: {launched} launched, nothing reaped"]
        lines.append(report.pilots_table(counts))
        for a in actions:
            lines.append(f"  {a['action']} {a['id']} at {a['entry']}: {a['reason']}")
        if stuck:
            lines.append(f"STUCK (terminate asked, still present; never counted as capacity): {stuck}")
        for e, b in sorted(backoff.items()):
            lines.append(f"Entry {e} backed off for {int(b['until'] - now)} s: {b['reason']}")
        for f in failed:
            lines.append(f"Entry {f['entry']}: {f['call']} failed: {f['message']}")
        self.log.info("%s", "\n".join(lines))
        pilotdb.prune_failures(store, now - FAILURES_KEPT)
        pilotdb.prune_launch_calls(store, now - max(grace, FAILURES_KEPT))
        return status


FAILURES_KEPT = 7 * 86400  # s a run's failures stay on record (a cleared run re-reads its own)


class CycleCheckOperator(GlideinBaseOperator):
    """The run's verdict: fails, with one ERROR line per failed entry and call, if any listing, launch or
    termination of this factory run failed (sites alert on red runs).

    It runs after ``report`` whatever happened (the status is published first: an asset event is only
    emitted by a task that succeeds), and reads the failures from the state store, where each task
    recorded them (a retry that went through cleared its own).
    """

    def execute(self, context: Context) -> None:
        failed = pilotdb.failures(state.store(), context["run_id"])
        if not failed:
            self.log.info("Every listing, launch and termination of this cycle went through")
            return
        for f in failed:
            self.log.error("Entry %s: %s failed: %s", f["entry"], f["call"], f["message"])
        raise AirflowFailException(f"{len({f['entry'] for f in failed})} entries failed this cycle: "
                                   + "; ".join(f"{f['entry']} ({f['call']})" for f in failed[:20]))


def merged_errors(inventories: Any) -> dict[str, str]:
    """Listing errors of one inventory result, or of several (one per endpoint)."""
    out: dict[str, str] = {}
    for inv in _each(inventories):
        out.update(inv.get("errors", {}))
    return out


def merged_quotas(inventories: Any) -> list[dict[str, Any]]:
    """Provider headroom of every quota scope the inventories read ({"entries", "headroom"})."""
    return [q for inv in _each(inventories) for q in inv.get("quotas", [])]


def _each(inventories: Any) -> list[dict[str, Any]]:
    return [inv or {} for inv in ([inventories] if isinstance(inventories, dict) else inventories or [])]
