"""``python -m airflow_glidein``: check a configuration, plan from a queue file, run the bootstrap service.

Log lines go to stderr; stdout carries only a command's output (``pubkey > factory.pub``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

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

    try:
        path = args.config or config_path()
    except ConfigError as exc:
        print(f"serve-bootstrap: no configuration file: name it, or set {exc.path} "
              "(AIRFLOW__GLIDEIN__CONFIG_FILE)", file=sys.stderr)
        return 1
    if _load(path) is None:
        return 1
    if bool(args.tls_cert) != bool(args.tls_key):
        print("serve-bootstrap: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    from airflow_glidein import state

    try:  # a replica that cannot share the factory's store must not start; migrate before the first pilot
        state.store()
    except state.StateStoreError as exc:
        print(exc, file=sys.stderr)
        return 1
    app = create_app(ui=False, config_file=path)
    scheme = "https" if args.tls_cert else "http"
    print(f"glidein bootstrap service on {scheme}://{args.host}:{args.port}{args.prefix} (config {path})", flush=True)
    if args.prefix:
        from fastapi import FastAPI

        root = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
        root.mount(args.prefix, app)
        app = root
    # proxy_headers off: the client address is the peer's, or what [glidein] bootstrap_trusted_proxies allow
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", proxy_headers=False,
                ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key)
    return 0


def cmd_pubkey(args: argparse.Namespace) -> int:
    """The envelope signing key's public half (or the previous key's), to bake into VM images."""
    from airflow_glidein import userdata
    from airflow_glidein.bootstrap import keys
    from airflow_glidein.state import store

    try:
        ring = keys.key_ring(store())
    except keys.KeyUnavailable as exc:
        print(f"pubkey: {exc}", file=sys.stderr)
        return 1
    if args.previous and ring.previous is None:
        print("pubkey: no previous signing key is configured ([glidein] signing_key_previous_conn_id, or extra "
              "previous_key of the signing key connection)", file=sys.stderr)
        return 1
    key = ring.previous if args.previous else ring.signing.public_key()
    pem = userdata.public_pem(key)
    sys.stdout.write(pem)
    print(f"# key id {userdata.key_id(key)}; sha256 fingerprint (GLIDEIN_PUBKEY_SHA256): {userdata.fingerprint(pem)}",
          file=sys.stderr)
    if ring.previous is not None and not args.previous:
        print(f"# the previous key, id {userdata.key_id(ring.previous)}, is still accepted: "
              "`pubkey --previous > factory.pub.previous`", file=sys.stderr)
    return 0


def cmd_genkey(args: argparse.Namespace) -> int:
    """A new signing key into a mode-0600 file (never over an existing one); its public half on stdout."""
    from airflow_glidein import userdata

    key = userdata.generate_key()
    try:
        fd = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        print(f"genkey: cannot create {args.file}: {exc.strerror} (it never overwrites a file)", file=sys.stderr)
        return 1
    with os.fdopen(fd, "w") as f:
        f.write(userdata.private_pem(key))
    pem = userdata.public_pem(key)
    sys.stdout.write(pem)
    print(f"# {args.file}: the private key (mode 0600), for the signing key connection's password; key id "
          f"{userdata.key_id(key)}, sha256 fingerprint {userdata.fingerprint(pem)}", file=sys.stderr)
    return 0


def cmd_migrate_state(args: argparse.Namespace) -> int:
    """Bring the state store to the newest schema revision (tasks do it too, on first use)."""
    from airflow_glidein import state

    st = state.store(args.url)
    print(f"glidein state store {st.engine.url.render_as_string(hide_password=True)}: revision {st.revision} "
          f"(head {state.head()})")
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
    checks = preflight.run(cfg, args.entry, probe_launch=args.probe_launch)
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
    from sqlalchemy.exc import DBAPIError

    rows = []
    for endpoint, entries in sorted(cfg.endpoints().items()):
        slots = max(e.api_budget.concurrency for e in entries)
        names = ", ".join(e.name for e in entries)
        try:
            Pool.create_or_update_pool(name=pool_name(endpoint), slots=slots, include_deferred=False,
                                       description=f"airflow-glidein: calls to {endpoint} (entries {names})")
        except DBAPIError as exc:  # the driver's own message: no SQL, no parameters
            lines = str(exc.orig).strip().splitlines()
            reason = lines[0][:200] if lines else type(exc.orig).__name__
            print(f"sync-pools: cannot write Airflow's pools ({reason}): is Airflow's metadata database reachable "
                  "and migrated? Run `airflow db migrate` first", file=sys.stderr)
            return 1
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


def _controls(args: argparse.Namespace):
    """(config, store, who, now) for a control command; a bad scope or time raises ControlError."""
    import getpass
    import time

    from airflow_glidein import controls, state

    cfg = _load(args.config)
    if cfg is None:
        raise controls.ControlError("the configuration is not valid (see above)")
    entry, frontend = getattr(args, "entry", None) or "", getattr(args, "frontend", None) or ""
    controls.check_scope(entry, frontend, [e.name for e in cfg.entries], [f.name for f in cfg.frontends])
    return cfg, state.store(), args.who or f"{getpass.getuser()} (cli)", time.time()


def cmd_downtime(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from airflow_glidein import controls

    try:
        _cfg, st, who, now = _controls(args)
        if args.action == "add":
            start = controls.parse_time(args.start, now, "--start") or now
            end = controls.parse_time(args.end, now, "--end")
            did = controls.add(st, controls.DOWNTIME, args.entry or "", args.frontend or "", start, end, args.reason,
                               who, now, drain=args.drain)
            print(f"downtime #{did} on {controls.scope_name(args.entry or '', args.frontend or '')} "
                  f"from {controls.iso(start)} {'to ' + controls.iso(end) if end else 'until ended'}"
                  f"{', draining its pilots' if args.drain else ''}: {args.reason.strip()}")
        elif args.action == "end":
            d = controls.end(st, args.id, who, now)
            print(f"{d.kind} #{d.id} on {d.scope} ended")
        else:
            rows = controls.load(st, now, None if args.all else controls.DOWNTIME)
            if args.json:
                print(json.dumps([asdict(d) | {"active": d.active(now)} for d in rows], indent=1, default=str))
            for d in [] if args.json else rows:
                print(f"#{d.id} {d.kind} {'ACTIVE' if d.active(now) else 'scheduled'} {d.scope}: "
                      f"{controls.iso(d.start)} .. {controls.iso(d.end) if d.end else 'until ended'}"
                      f"{' drain' if d.drain else ''} by {d.who}: {d.reason}")
            if not rows and not args.json:
                print("no downtime in effect or scheduled")
    except controls.ControlError as exc:
        print(f"downtime {args.action}: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from airflow_glidein import controls

    try:
        _cfg, st, who, now = _controls(args)
        scope = controls.scope_name(args.entry or "", args.frontend or "")
        if args.command == "stop":
            did = controls.add(st, controls.STOP, args.entry or "", args.frontend or "", now, None, args.reason, who,
                               now)
            print(f"stop #{did}: no launches at {scope} until resumed (running submits stop before their next "
                  "provider call); reaping continues")
        else:
            ended = controls.resume(st, args.entry or "", args.frontend or "", who, now)
            print(f"resumed launches at {scope} (ended stop {', '.join(f'#{d.id}' for d in ended)})")
    except controls.ControlError as exc:
        print(f"{args.command}: {exc}", file=sys.stderr)
        return 2
    return 0


def _scope_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--entry", help="only this entry (default: every entry)")
    p.add_argument("--frontend", help="only this frontend (default: every frontend)")
    p.add_argument("--config", help="configuration file (default: [glidein] config_file)")
    p.add_argument("--who", help="who sets it, for the history (default: your login name)")


@contextmanager
def _logs_to_stderr() -> Iterator[None]:
    """Airflow's logging writes to stdout; while a command runs, its log lines go to stderr instead."""
    import airflow  # noqa: F401 - sets up Airflow's logging, so there is a handler to move
    import structlog

    moved = [h for h in logging.getLogger().handlers
             if isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.__stdout__)]
    streams = [h.setStream(sys.stderr) for h in moved]
    factory = structlog.get_config().get("logger_factory")
    native = getattr(factory, "io", False) is None  # Airflow's structlog loggers: stdout unless told
    if native:
        factory.io = sys.stderr
    try:
        yield
    finally:
        for h, stream in zip(moved, streams):
            h.setStream(stream)
        if native:
            factory.io = None


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError("a TCP port is a number from 1 to 65535")
    return port


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
    p.add_argument("--port", type=_port, default=8081)
    p.add_argument("--prefix", default="/glidein", help="URL prefix, as in the factory's bootstrap_url (default /glidein)")
    p.add_argument("--tls-cert", help="serve https with this PEM certificate (chain) file")
    p.add_argument("--tls-key", help="the PEM private key of --tls-cert")
    p.set_defaults(func=cmd_serve_bootstrap, airflow=True)
    p = sub.add_parser("preflight", help="check credentials, providers, images, flavors, collector and bootstrap "
                                         "service before the first cycle (calls the providers)")
    p.add_argument("config", nargs="?", help="configuration file (default: [glidein] config_file)")
    p.add_argument("--entry", action="append", help="only this entry (repeatable)")
    p.add_argument("--probe-launch", action="store_true",
                   help="EC2 entries: launch one small instance (twice with one ClientToken), tag and terminate it, "
                        "to see what the endpoint honours (costs an instance for a few minutes)")
    p.set_defaults(func=cmd_preflight, airflow=True)
    p = sub.add_parser("sync-pools", help="create or resize one Airflow pool per provider API endpoint")
    p.add_argument("config", nargs="?", help="configuration file (default: [glidein] config_file)")
    p.set_defaults(func=cmd_sync_pools, airflow=True)
    p = sub.add_parser("migrate-state", help="upgrade the glidein state store to the newest schema revision")
    p.add_argument("--url", help="SQLAlchemy URL (default: the [glidein] state_conn_id connection)")
    p.set_defaults(func=cmd_migrate_state, airflow=True)
    p = sub.add_parser("pubkey", help="print the envelope signing key's public PEM (bake it into the VM image)")
    p.add_argument("--previous", action="store_true", help="the previous key's, still accepted during a rotation")
    p.set_defaults(func=cmd_pubkey, airflow=True)
    p = sub.add_parser("genkey", help="write a new signing key to FILE (mode 0600) and print its public PEM")
    p.add_argument("file")
    p.set_defaults(func=cmd_genkey)
    p = sub.add_parser("import-gwms", help="write our YAML from a glideinWMS frontend and factory configuration")
    p.add_argument("--frontend", required=True, help="the frontend's frontend.xml")
    p.add_argument("--factory", required=True, help="the factory's glideinWMS.xml (its config.d/*.xml are read too)")
    p.add_argument("-o", "--output", help="write the YAML here (default: standard output)")
    p.set_defaults(func=cmd_import_gwms)
    p = sub.add_parser("downtime", help="add, list or end downtimes (no launches there; see README, Operator controls)")
    dsub = p.add_subparsers(dest="action", required=True)
    d = dsub.add_parser("add", help="a downtime on an entry, a frontend, both, or the whole factory")
    _scope_args(d)
    d.add_argument("--start", help="now (default), +2h, or ISO 8601 (UTC unless it says)")
    d.add_argument("--end", help="+2h or ISO 8601 (default: until ended)")
    d.add_argument("--reason", required=True)
    d.add_argument("--drain", action="store_true", help="retire its pilots while it lasts (default: they keep running)")
    d = dsub.add_parser("list", help="downtimes in effect or scheduled")
    d.add_argument("--all", action="store_true", help="stops too")
    d.add_argument("--json", action="store_true")
    d.add_argument("--config", help=argparse.SUPPRESS)
    d.add_argument("--who", help=argparse.SUPPRESS)
    d = dsub.add_parser("end", help="end (or cancel) downtime ID now")
    d.add_argument("id", type=int)
    d.add_argument("--config", help="configuration file (default: [glidein] config_file)")
    d.add_argument("--who", help="who ends it (default: your login name)")
    p.set_defaults(func=cmd_downtime, airflow=True)
    p = sub.add_parser("stop", help="stop all launches (factory-wide, --frontend, --entry) now, even mid-run")
    _scope_args(p)
    p.add_argument("--reason", required=True)
    p.set_defaults(func=cmd_stop, airflow=True)
    p = sub.add_parser("resume", help="end the stop on exactly this scope")
    _scope_args(p)
    p.set_defaults(func=cmd_stop, airflow=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    with _logs_to_stderr() if getattr(args, "airflow", False) else nullcontext():
        return args.func(args)
