"""Plain-text tables for plans and pilot inventories (task logs, CLI, demo)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plan_table(request: Mapping[str, Any]) -> str:
    entries = request.get("entries", {})
    priced = any("fom" in p["why"] for p in entries.values())  # entries with prices: show the figure of merit
    rows = []
    for name, p in sorted(entries.items()):
        w = p["why"]
        pc = w["pilots"]
        bound = w["bound_by"] + (f" [{'; '.join(w['curbs'])}]" if w.get("curbs") else "")
        rows.append([
            name, w["idle_jobs"], w["cores"], *([w.get("fom", "-")] if priced else []), w["wanted"],
            f"{pc['booting']}/{pc['idle']}/{pc['busy']}", w.get("add", "-"), p["idle"], p["max_running"], bound,
        ])
    for name, reason in sorted(request.get("skipped", {}).items()):
        rows.append([name, "-", "-", *(["-"] if priced else []), "-", "-", "-", 0, 0, f"skipped: {reason}"])
    head = f"Plan of frontend {request.get('frontend')}"
    if request.get("missing_schedds"):
        head += " (schedds not answering: " + ", ".join(m["schedd"] for m in request["missing_schedds"]) + ")"
    return head + "\n" + table(
        ["entry", "idle jobs", "cores", *(["fom"] if priced else []), "wanted", "boot/idle/busy", "add", "level",
         "max run", "bound by"], rows
    )


def pilots_table(counts: Mapping[str, Mapping[str, Mapping[str, int]]]) -> str:
    states: list[str] = []
    for fes in counts.values():
        for c in fes.values():
            states += [s for s in c if s != "total" and s not in states]
    rows = []
    for entry, fes in sorted(counts.items()):
        for fe, c in sorted(fes.items()):
            rows.append([entry, fe, *(c.get(s, 0) for s in states), c.get("total", 0)])
    if not rows:
        return "(no pilots)"
    return table(["entry", "frontend", *states, "live"], rows)
