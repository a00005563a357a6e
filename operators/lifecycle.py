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

from airflow.sdk.exceptions import AirflowException

from airflow_glidein import lifecycle as L
from airflow_glidein import history, metrics, pilotdb, report, state
from airflow_glidein import pilots as P
from airflow_glidein.assets import GLIDEIN_STATUS
from airflow_glidein.config import Config, Entry
from airflow_glidein.credentials import usable_on
from airflow_glidein.hooks import pilot_hook
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
                   row["launched"], row.get("provider_state") or "", burst=row.get("burst"))


def pilot_counts(rows: Any) -> dict[str, dict[str, dict[str, int]]]:
    return P.counts(as_pilot(r) for r in rows)


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
    remembered pilots untouched.
    """

    template_fields: Sequence[str] = ("entries", "config_file")

    def __init__(self, *, entries: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.entries = entries

    def execute(self, context: Context) -> dict[str, Any]:
        cfg, now, store = self.config, self.now(), state.store()
        mine = [cfg.entry(n) for n in self.entries] if self.entries else list(cfg.entries)
        frontends = {f.name for f in cfg.frontends}
        startds = self._startds()
        remembered = pilotdb.load_pilots(store, [e.name for e in mine])
        listed, errors = self._listings(mine)
        quotas = self._quotas(mine)
        rows: list[dict[str, Any]] = []
        for entry in mine:
            for iid, (inst, conn_id) in listed.get(entry.name, {}).items():
                prev = remembered.pop(iid, None)
                frontend = inst.tags.get(P.TAG_FRONTEND)
                startd = startds.get(iid) if startds is not None else None
                removed = inst.tags.get(P.TAG_ENTRY) != entry.name  # a removed entry's pilot, reached through this one
                obs = L.Observation(inst.state, inst.launched, known=frontend in frontends and not removed,
                                    startd=startd, collector=startds is not None)
                policy = cfg.policy_for(entry, frontend)
                st, mem = L.transition(L.Memory.from_dict(prev and prev["memory"]), obs, now, policy.boot_timeout)
                rows.append({
                    "id": iid, "entry": entry.name, "frontend": frontend, "burst": inst.tags.get(P.TAG_BURST),
                    "policy": tag_policy(inst.tags), "launch": inst.launch_id,
                    "request": inst.tags.get(P.TAG_REQUEST), "factory_run": inst.tags.get(P.TAG_FACTORY_RUN),
                    "launched": inst.launched, "state": st, "provider_state": inst.state, "conn": conn_id,
                    "detail": "; ".join(filter(None, [
                        f"entry {inst.tags.get(P.TAG_ENTRY)!r} is no longer configured" if removed else "",
                        inst.detail])), "startd": {k: startd[k] for k in STARTD_KEEP if k in startd} if startd else None,
                    "memory": mem.to_dict(), "updated": now, "_prev": prev and prev["state"],
                })
        # Remembered pilots missing from a good listing are gone: terminated, verified.
        gone = [pid for pid, row in remembered.items() if row["entry"] not in errors]
        pilotdb.delete_pilots(store, gone)
        pilotdb.forget_entries_except(store, [e.name for e in cfg.entries])
        pilotdb.save_pilots(store, rows)
        self._entry_health(store, rows, now)
        counts = pilot_counts(rows)
        self.log.info("Pilots per entry and state:\n%s", report.pilots_table(counts))
        if gone:
            self.log.info("%d pilots left their provider since the last cycle: %s", len(gone), sorted(gone)[:20])
        return {"counts": counts, "errors": errors, "collector": startds is not None, "gone": len(gone),
                "quotas": quotas}

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

    def _listings(self, entries: list[Entry]) -> tuple[dict[str, dict], dict[str, str]]:
        """{entry: {id: (instance, connection)}} and {entry: error}, in as few listings as the APIs allow.

        Where one pass lists a whole scope (an EC2 region, an OpenNebula user's
        pool), it also shows pilots of entries removed from the configuration:
        they are listed under the scope's first entry (whose hook and
        connection reach them) and handled as orphans (DESIGN.md: drained
        unless idle or past their lifetime). Elsewhere they are out of sight;
        they end themselves at their idle timeout or lifetime.
        """
        cfg = self.config
        configured = {e.name for e in cfg.entries}
        groups: dict[tuple, list[tuple[Entry, Any]]] = {}
        for entry in entries:
            for conn_id in provision_conns(cfg, entry):
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
                        if tagged in names or tagged not in configured:
                            owner = tagged if tagged in names else members[0][0].name
                            listed[owner].setdefault(inst.id, (inst, conn_id))
                    continue
                for entry, hook in members:
                    for inst in hook.list_pilots():
                        listed[entry.name].setdefault(inst.id, (inst, conn_id))
            except Exception as exc:  # one provider down must not stop the other entries
                self.log.warning("Entries %s: listing with connection %s failed: %s", sorted(names), conn_id, exc)
                for name in names:
                    errors[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
                    metrics.incr(1, "failures", name, "listing", entry=name, kind="listing")
        return listed, errors

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
        cfg, now, store = self.config, self.now(), state.store()
        actions = [L.Action(**a) for a in self.actions or [] if not self.entries or a["entry"] in self.entries]
        rows = pilotdb.load_pilots(store)
        groups: dict[tuple[str, str, str], list[L.Action]] = {}
        for a in actions:
            if a.action == "retire" and (rows.get(a.id, {}).get("memory") or {}).get("retire_requested") is not None:
                continue  # asked already (this is a retry): once is enough
            if a.id in rows:
                groups.setdefault((a.entry, rows[a.id]["conn"], a.action), []).append(a)
        memory: dict[str, dict] = {}
        states: dict[str, str] = {}
        done, failed = [], []
        for (entry_name, conn_id, kind), items in sorted(groups.items()):
            ids = sorted(a.id for a in items)
            try:
                if kind == "retire":  # one startd that cannot be asked must not stop the others being remembered
                    refused = self._retire([rows[i] for i in ids])
                    failed += [a for a in items if a.id in refused]
                    items = [a for a in items if a.id not in refused]
                else:
                    pilot_hook(cfg.entry(entry_name), cfg.factory.name, conn_id).terminate(
                        ids, force=kind == "force_terminate"
                    )
            except Exception as exc:
                self.log.warning("Entry %s: %s of %d pilots failed: %s", entry_name, kind, len(ids), exc)
                metrics.incr(1, "failures", entry_name, "terminate", entry=entry_name, kind="terminate")
                failed += items
                continue
            metrics.incr(len(items), "terminations", entry_name, kind, entry=entry_name, action=kind)
            for a in items:
                self.log.info("%s %s at %s: %s", kind, a.id, a.entry, a.reason)
                mem = rows[a.id].get("memory") or {}
                if kind == "retire":
                    memory[a.id] = {"retire_requested": now}
                    states[a.id] = P.RETIRING
                else:
                    memory[a.id] = {"terminate_requested": now,
                                    "terminate_attempts": int(mem.get("terminate_attempts", 0)) + 1,
                                    "terminate_reason": mem.get("terminate_reason") or a.reason}
                    states[a.id] = P.STUCK if rows[a.id]["state"] == P.STUCK else P.TERMINATING
            if kind != "retire":
                done.append({"entry": entry_name, "conn": conn_id, "ids": ids})
        pilotdb.update_memory(store, memory, now, states)
        if failed:
            raise AirflowException(f"{len(failed)} reaping actions failed: {[f'{a.action} {a.id}' for a in failed][:20]}")
        return done

    def _retire(self, rows: list[dict]) -> dict[str, str]:
        """Ask each startd to shut down peacefully: running jobs finish, then the pilot exits.

        Returns the pilots whose startd could not be asked, with why.
        """
        hook = HTCondorHook(collector=self.config.factory.collector)
        refused = {}
        for row in rows:
            name = (row.get("startd") or {}).get("Name")
            try:
                if not name:
                    raise AirflowException(f"pilot {row['id']} has no startd to retire")
                hook.retire_startd(name)
            except Exception as exc:
                self.log.warning("Pilot %s: retiring startd %s failed: %s", row["id"], name, exc)
                refused[row["id"]] = f"{type(exc).__name__}: {exc}"
        return refused


class FactoryReportOperator(GlideinBaseOperator):
    """Publish pilot counts (and backoff, stuck pilots) on ``glidein_status``; print the cycle's summary."""

    template_fields: Sequence[str] = ("inventory", "submitted", "actions", "decisions", "config_file")

    def __init__(self, *, inventory: Any, submitted: Any, actions: Any, decisions: Any = None, **kwargs: Any) -> None:
        kwargs.setdefault("outlets", [GLIDEIN_STATUS])
        super().__init__(**kwargs)
        self.inventory = inventory
        self.submitted = submitted
        self.actions = actions
        self.decisions = decisions

    def execute(self, context: Context) -> dict[str, Any]:
        cfg, now, store = self.config, self.now(), state.store()
        rows = list(pilotdb.load_pilots(store, [e.name for e in cfg.entries]).values())
        launched = 0
        for item in _flatten(self.submitted):
            for batch in item["launched"]:
                for iid in batch["created"] + batch.get("existing", []):  # a retry finds what an earlier try made
                    launched += 1
                    rows.append({"id": iid, "entry": item["entry"], "frontend": batch["frontend"],
                                 "launch": batch["launch_id"], "state": P.REQUESTED, "launched": now})
        counts = pilot_counts(rows)
        history.record_factory(counts, now, store)  # the Pilots page's charts
        backoff = {e: {"until": h["until"], "failures": h["failures"], "reason": h["reason"]}
                   for e, h in pilotdb.load_health(store).items() if h["until"] > now}
        stuck = sorted(r["id"] for r in rows if r["state"] == P.STUCK)
        actions = self.actions or []
        status = {
            "factory": cfg.factory.name,
            "pilots": counts,
            "launched": launched,
            "actions": dict(Counter(a["action"] for a in actions)),
            "stuck": stuck,
            "backoff": backoff,
            "errors": merged_errors(self.inventory),
            "decisions": self.decisions or {},
            "run_id": context["run_id"],
        }
        context["outlet_events"][GLIDEIN_STATUS].extra = status
        metrics.pilots(counts, P.STATES)
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
        for e, err in sorted(status["errors"].items()):
            lines.append(f"Entry {e} could not be listed: {err}")
        self.log.info("%s", "\n".join(lines))
        return status


def _items(seq: Any) -> list:
    """A mapped task's results; indexing by length avoids probing past the end."""
    return [seq[i] for i in range(len(seq))] if seq else []


def _flatten(outputs: Any) -> list:
    """The results of one mapped task, or of several (one per endpoint), as one list."""
    if isinstance(outputs, (list, tuple)):
        return [item for seq in outputs for item in _items(seq)]
    return _items(outputs)


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
