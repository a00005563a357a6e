"""``python -m airflow_glidein``: check a configuration, plan from a queue file, run the bootstrap service."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from airflow_glidein.config import Config, ConfigError, load_config

log = logging.getLogger("airflow_glidein")


def _summary(cfg: Config) -> str:
    lines = [f"factory {cfg.factory.name}: bootstrap {cfg.factory.bootstrap_url}, "
             f"collector {cfg.factory.collector or '(none: registration not observed)'}"]
    lines.append(f"{len(cfg.entries)} entries:")
    for e in cfg.entries:
        lines.append(f"  {e.name}: {e.middleware} {e.region or ''} image={e.image or '-'} flavor={e.flavor or '-'} "
                     f"{e.cores} cores/{e.memory_mb} MB/{e.gpus} GPUs, trust domain {e.trust_domain} "
                     f"({e.auth_method}), max {e.limits.max_pilots} pilots")
    lines.append(f"{len(cfg.frontends)} frontends:")
    for f in cfg.frontends:
        lines.append(f"  {f.name}: entries {', '.join(f.entries)}; credentials {', '.join(f.credentials)}; "
                     f"schedule {f.schedule or 'manual'}")
    lines.append(f"{len(cfg.credentials)} credentials:")
    for c in cfg.credentials:
        lines.append(f"  {c.id}: {c.type} for {c.purpose}, trust domain {c.trust_domain}, connection {c.conn_id}")
    return "\n".join(lines)


def _load(path: str | None) -> Config | None:
    """The configuration (default: ``[glidein] config_file``), or None with every problem printed."""
    from airflow_glidein.config import config_path

    try:
        return load_config(path or config_path())
    except ConfigError as exc:
        print(f"{exc.path}: configuration rejected ({len(exc.problems)} problem(s)):", file=sys.stderr)
        for p in exc.problems:
            print(f"  - {p}", file=sys.stderr)
        return None


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return 1
    print(_summary(cfg))
    print("configuration OK")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from airflow_glidein import credentials, demand, planning, report

    cfg = _load(args.config)
    if cfg is None:
        return 1
    names = [args.frontend] if args.frontend else [f.name for f in cfg.frontends]
    out = {}
    for name in names:
        try:
            fe = cfg.frontend(name)
        except KeyError as exc:
            print(exc.args[0], file=sys.stderr)
            return 1
        attrs = demand.match_attributes(fe.match_expr, [cfg.entry(e) for e in fe.entries])
        try:
            groups = demand.read_queue_file(args.queue, attrs)
        except ValueError as exc:
            print(str(exc), file=sys.stderr)
            return 1
        demand.match_groups(groups, demand.matcher_for(cfg, name))
        request = planning.plan_frontend(cfg, name, groups, credentials.select(cfg, name))
        request["demand"] = demand.summarize(groups)
        out[name] = request
        if not args.json:
            d = request["demand"]
            print(f"{d['idle']} idle / {d['running']} running jobs in {d['groups']} groups "
                  f"({d['idle_unmatched']} idle match no entry)")
            print(report.plan_table(request))
            print()
    if args.json:
        json.dump(out, sys.stdout, indent=2, sort_keys=True)
        print()
    return 0


def cmd_serve_bootstrap(args: argparse.Namespace) -> int:
    """The bootstrap service on its own (pilot routes only; the log viewer lives in the Airflow UI)."""
    import uvicorn

    from airflow_glidein.bootstrap.app import create_app

    from airflow_glidein.config import config_path

    path = args.config or config_path()
    if _load(path) is None:
        return 1
    app = create_app(ui=False, config_file=path)
    print(f"glidein bootstrap service on http://{args.host}:{args.port}{args.prefix} (config {path})", flush=True)
    if args.prefix:
        from fastapi import FastAPI

        root = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
        root.mount(args.prefix, app)
        app = root
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def cmd_pubkey(args: argparse.Namespace) -> int:
    """The envelope signing key's public half, to bake into VM images, and its fingerprint to pin."""
    from airflow_glidein import userdata
    from airflow_glidein.bootstrap import keys
    from airflow_glidein.state import store

    pem = keys.public_pem(store())
    sys.stdout.write(pem)
    print(f"# sha256 fingerprint (GLIDEIN_PUBKEY_SHA256): {userdata.fingerprint(pem)}", file=sys.stderr)
    return 0


def cmd_preflight(args: argparse.Namespace) -> int:
    """Check credentials, providers, images, flavors, the collector and the bootstrap service."""
    from airflow_glidein import preflight
    from airflow_glidein.report import table

    cfg = _load(args.config)
    if cfg is None:
        return 1
    unknown = sorted(set(args.entry or []) - {e.name for e in cfg.entries})
    if unknown:
        print(f"{args.config}: no entries {unknown}", file=sys.stderr)
        return 2
    checks = preflight.run(cfg, args.entry)
    print(table(["scope", "check", "result", "detail"],
                [[c.scope, c.what, "ok" if c.ok else "FAILED", c.detail] for c in checks]))
    failed = sum(not c.ok for c in checks)
    print(f"{len(checks)} checks, {failed} failed")
    return 1 if failed else 0


def cmd_sync_pools(args: argparse.Namespace) -> int:
    """One Airflow pool per API endpoint, sized by its entries' api_budget.concurrency.

    The factory DAG runs every task that calls an endpoint in that endpoint's
    pool. Writes Airflow's metadata DB, like ``airflow pools set``: run it
    where the Airflow CLI runs.
    """
    from airflow_glidein.config import pool_name
    from airflow_glidein.report import table

    cfg = _load(args.config)
    if cfg is None:
        return 1
    from airflow.models.pool import Pool

    rows = []
    for endpoint, entries in sorted(cfg.endpoints().items()):
        slots = max(e.api_budget.concurrency for e in entries)
        names = ", ".join(e.name for e in entries)
        Pool.create_or_update_pool(name=pool_name(endpoint), slots=slots, include_deferred=False,
                                   description=f"airflow-glidein: calls to {endpoint} (entries {names})")
        rows.append([pool_name(endpoint), slots, names])
    print(table(["pool", "slots", "entries"], rows))
    return 0


def cmd_import_gwms(args: argparse.Namespace) -> int:
    """Our YAML from a glideinWMS frontend.xml and factory glideinWMS.xml; what is not translated, with its line."""
    from airflow_glidein import gwms_import
    from airflow_glidein.config import parse_config

    try:
        result = gwms_import.import_gwms(args.frontend, args.factory)
    except gwms_import.GwmsImportError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    try:
        parse_config(result.config, args.output or "<imported>")  # never write a file check-config refuses
    except ConfigError as exc:
        print(f"the imported configuration is refused ({len(exc.problems)} problem(s)):", file=sys.stderr)
        for p in exc.problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    text = gwms_import.to_yaml(result)
    if args.output:
        try:
            with open(args.output, "w") as fh:
                fh.write(text)
        except OSError as exc:
            print(f"{args.output}: cannot write the file: {exc.strerror}", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    for title, lost in (("to check", False), ("not translated", True)):
        notes = [n for n in result.notes if n.lost == lost]
        if notes:
            print(f"{len(notes)} {title}:", file=sys.stderr)
            for n in notes:
                print(f"  {n}", file=sys.stderr)
    if args.output:
        print(f"wrote {args.output}: {len(result.config['entries'])} entries, {len(result.config['frontends'])} "
              f"frontends, {len(result.config['credentials'])} credentials", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m airflow_glidein", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check-config", help="validate a configuration file and print its summary")
    p.add_argument("config")
    p.set_defaults(func=cmd_check_config)
    p = sub.add_parser("plan", help="print the frontends' plans for a condor_q -json file; touches no cloud")
    p.add_argument("config")
    p.add_argument("--queue", required=True, help="condor_q -json or condor_q -autocluster -json output")
    p.add_argument("--frontend", help="only this frontend")
    p.add_argument("--json", action="store_true", help="print the requests as JSON")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("serve-bootstrap", help="run the bootstrap service on its own (without the Airflow API server)")
    p.add_argument("config", nargs="?", default=None, help="configuration file (default: [glidein] config_file)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8081)
    p.add_argument("--prefix", default="/glidein", help="URL prefix, as in the factory's bootstrap_url (default /glidein)")
    p.set_defaults(func=cmd_serve_bootstrap)
    p = sub.add_parser("preflight", help="check credentials, providers, images, flavors, collector and bootstrap "
                                         "service before the first cycle (calls the providers)")
    p.add_argument("config", nargs="?", help="configuration file (default: [glidein] config_file)")
    p.add_argument("--entry", action="append", help="only this entry (repeatable)")
    p.set_defaults(func=cmd_preflight)
    p = sub.add_parser("sync-pools", help="create or resize one Airflow pool per provider API endpoint")
    p.add_argument("config", nargs="?", help="configuration file (default: [glidein] config_file)")
    p.set_defaults(func=cmd_sync_pools)
    p = sub.add_parser("pubkey", help="print the envelope signing key's public PEM (bake it into the VM image)")
    p.set_defaults(func=cmd_pubkey)
    p = sub.add_parser("import-gwms", help="write our YAML from a glideinWMS frontend and factory configuration")
    p.add_argument("--frontend", required=True, help="the frontend's frontend.xml")
    p.add_argument("--factory", required=True, help="the factory's glideinWMS.xml (its config.d/*.xml are read too)")
    p.add_argument("-o", "--output", help="write the YAML here (default: standard output)")
    p.set_defaults(func=cmd_import_gwms)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    return args.func(args)
