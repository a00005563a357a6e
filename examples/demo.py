"""`make demo`: one provisioning cycle on the embedded default, end to end.

Starts moto's EC2 server on 127.0.0.1 (an emulator: no real cloud is touched),
makes a throwaway AIRFLOW_HOME with SQLite, runs the frontend DAG once and the
factory DAG once on examples/glidein.yaml and the queue snapshot
examples/queue.json, prints the plan and the pilots, and stops what it started.
No HTCondor pool is attached, so pilots are seen as booting (registration is
not observed).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import sys
import warnings
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOME = REPO / ".demo" / "airflow-home"

shutil.rmtree(HOME, ignore_errors=True)
HOME.mkdir(parents=True)
os.environ.update({
    "AIRFLOW_HOME": str(HOME),
    "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{HOME}/airflow.db",
    "AIRFLOW__LOGGING__LOGGING_LEVEL": "ERROR",
    "AIRFLOW__GLIDEIN__CONFIG_FILE": str(REPO / "examples" / "glidein.yaml"),
    "AWS_EC2_METADATA_DISABLED": "true",
})
warnings.filterwarnings("ignore")


def quiet() -> None:
    logging.disable(logging.WARNING)
    try:
        import structlog

        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    except Exception:
        pass


def main() -> int:
    from moto.server import ThreadedMotoServer

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # Demo credentials: the emulator accepts any key. In production these are
    # Airflow connections in your secrets backend; the config names only their ids.
    os.environ["AIRFLOW_CONN_GLIDEIN_AWS_DEMO"] = json.dumps({
        "conn_type": "aws", "login": "demo-access-key", "password": "demo-secret-key",
        "extra": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    })
    # An IDTOKEN is a JWT; this one is shaped like one (unsigned, no exp) so selection can read it.
    claims = base64.urlsafe_b64encode(b'{"iss": "demo-pool", "sub": "pilot@demo-pool"}').decode().rstrip("=")
    os.environ["AIRFLOW_CONN_GLIDEIN_CMS_POOL_TOKEN"] = json.dumps({
        "conn_type": "glidein_token", "password": f"eyJhbGciOiJIUzI1NiJ9.{claims}.demo-signature",
    })

    print("airflow-glidein demo")
    print(f"  EC2 is moto's emulator on {endpoint} (nothing real is launched or billed).")
    print("  No HTCondor pool is attached: demand comes from examples/queue.json, and")
    print("  pilots stay 'booting' because registration with a collector is not observed.")
    print(f"  Airflow home: {HOME} (SQLite)\n")
    try:
        quiet()
        from airflow.dag_processing.dagbag import DagBag
        from airflow.utils.db import initdb

        from airflow_glidein import lifecycle as L
        from airflow_glidein import pilots as P
        from airflow_glidein import report
        from airflow_glidein.config import get_config
        from airflow_glidein.hooks import pilot_hook

        initdb()
        quiet()
        from airflow_glidein.cli import main as glidein_cli

        print("Airflow pools, one per provider API endpoint (python -m airflow_glidein sync-pools):")
        glidein_cli(["sync-pools"])
        print()
        bag = DagBag(dag_folder=str(REPO / "dags"))
        if bag.import_errors:
            print("DAG import errors:", bag.import_errors, file=sys.stderr)
            return 1
        results = {}
        for dag_id in ("glidein_frontend_cms", "glidein_factory"):
            run = bag.get_dag(dag_id).test()
            quiet()
            results[dag_id] = run
            print(f"DAG run {dag_id}: {run.state}")
            if str(run.state) != "success":
                return 1
        request = _xcom(results["glidein_frontend_cms"], "plan_pilots")
        print()
        print(report.plan_table(request))

        cfg = get_config()
        frontends = [f.name for f in cfg.frontends]
        decisions = {w["entry"]: w["why"] for w in _xcom(results["glidein_factory"], "plan_cycle")}
        rows = []
        for entry in cfg.entries:
            listed = pilot_hook(entry, cfg.factory.name, "glidein_aws_demo").list_pilots()
            # No collector: what the provider lists is all we know of each pilot.
            pilots = [P.Pilot(i.id, entry.name, i.tags.get(P.TAG_FRONTEND), i.launch_id,
                              L.transition(L.Memory(), L.Observation(i.state, i.launched, True, collector=False),
                                           0, 0)[0], i.launched, i.state) for i in listed]
            for fe in frontends:
                mine = [p for p in pilots if p.frontend == fe]
                states = ", ".join(f"{n} {s}" for s, n in sorted(Counter(p.state for p in mine).items())) or "-"
                level = request["entries"].get(entry.name, {}).get("idle", 0)
                why = decisions.get(entry.name, {})
                rows.append([entry.name, fe, level, len(mine), len({p.launch for p in mine}), states,
                             why.get("bound_by", "-")])
        print("\nPilots per entry after one factory cycle (listed at the provider by tag):")
        print(report.table(["entry", "frontend", "requested", "pilots", "launches", "state", "launch bound by"], rows))
        print("\nThe frontend's level is bound by demand; the factory's launches by the entry limits")
        print("(max_idle, max_per_cycle in examples/glidein.yaml). Run the factory again: it launches")
        print("nothing more, because requests are levels and these pilots already count.")
        return 0
    finally:
        moto.stop()


def _xcom(run, task_id):
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.scalars(XComModel.get_many(run_id=run.run_id, dag_ids=run.dag_id, task_ids=task_id,
                                                 key="return_value")).first()
        return XComModel.deserialize_value(row)


if __name__ == "__main__":
    sys.exit(main())
