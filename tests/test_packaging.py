"""Packaging and registration: operators/sensors install under airflow_glidein, entry points, DAG parsing."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import zipfile
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from tests.helpers import DAGS, REPO


def test_operators_and_sensors_import_under_the_package_name():
    import airflow_glidein.operators as ops
    import airflow_glidein.sensors as sensors

    assert ops.__file__.startswith(str(REPO / "operators"))
    assert sensors.__file__.startswith(str(REPO / "sensors"))
    assert ops.SubmitPilotsOperator.__module__ == "airflow_glidein.operators.factory"


def test_wheel_maps_operators_and_sensors_into_the_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                    "-w", str(tmp_path), str(REPO)], check=True)
    wheel = next(tmp_path.glob("airflow_glidein-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "airflow_glidein/operators/factory.py" in names
    assert "airflow_glidein/sensors/__init__.py" in names
    assert {"airflow_glidein/migrations/env.py", "airflow_glidein/migrations/script.py.mako",
            "airflow_glidein/migrations/versions/0001_initial.py"} <= names  # the state store migrates itself
    assert "airflow_glidein/pilot/glidein-grid-pilot.sh" in names  # what grid jobs run, transferred from there
    assert not any(n.startswith(("operators/", "sensors/", "tests/", "dags/")) for n in names)


def test_registered_as_provider_and_plugin():
    ours = [ep for ep in entry_points(group="apache_airflow_provider") if ep.dist.name == "airflow-glidein"]
    assert [ep.value for ep in ours] == ["airflow_glidein.get_provider_info:get_provider_info"]
    plugins = {ep.name: ep.value for ep in entry_points(group="airflow.plugins")}
    assert plugins["glidein"] == "airflow_glidein.plugin:GlideinPlugin"

    from airflow_glidein.get_provider_info import get_provider_info

    info = get_provider_info()
    assert "hook-class-names" not in info
    types = {c["connection-type"]: c for c in info["connection-types"]}
    assert "htcondor" in types
    for conn in types.values():
        module, _, cls = conn["hook-class-name"].rpartition(".")
        assert getattr(__import__(module, fromlist=[cls]), cls)


def test_providers_manager_sees_our_connection_types(airflow_db):
    from airflow.providers_manager import ProvidersManager

    pm = ProvidersManager()
    assert "airflow-glidein" in pm.providers
    assert "htcondor" in pm.hooks


def test_dag_files_parse_without_network(airflow_db, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a DAG file opened a network connection at parse time")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS))
    assert not bag.import_errors, bag.import_errors
    assert {"glidein_factory", "glidein_frontend_cms", "glidein_burst"} <= set(bag.dag_ids)
    for dag_id in bag.dag_ids:
        dag = bag.get_dag(dag_id)
        assert dag.doc_md and not dag.catchup
        if dag_id != "glidein_burst":  # bursts may overlap; frontends and the factory run one at a time
            assert dag.max_active_runs == 1


def test_bad_config_is_a_dag_import_error_naming_the_field(airflow_db, tmp_path, monkeypatch):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "examples" / "glidein.yaml").read_text().replace("max_pilots: 20", "max_pilots: -1"))
    monkeypatch.setenv("AIRFLOW__GLIDEIN__CONFIG_FILE", str(bad))
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS))
    errors = "\n".join(bag.import_errors.values())
    assert "entries[aws-us-east-1].limits.max_pilots" in errors


@pytest.mark.parametrize("module", ["airflow_glidein.config", "airflow_glidein.planning", "airflow_glidein.provisioning",
                                    "airflow_glidein.demand", "airflow_glidein.pilots", "airflow_glidein.credentials",
                                    "airflow_glidein.middlewares"])
def test_engine_modules_do_not_import_airflow(module):
    code = f"import sys, {module}; print(any(m == 'airflow' or m.startswith('airflow.') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# Built from pieces so that this file does not name them itself.
_OUTSIDE = ("DESIGN" + ".md", "ANCHORS" + ".md", "../" + "shared", "/work/" + "shared")
_GENERATED = {".git", ".venv", "__pycache__", ".pytest_cache", "build", "dist", ".demo", "test-output"}


def test_the_repository_stands_alone():
    """The project's design is docs/architecture.md; no file points at documents users do not have."""
    assert (REPO / "docs" / "architecture.md").is_file()
    assert "docs/architecture.md" in (REPO / "README.md").read_text()
    offenders = []
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in _GENERATED and not d.endswith(".egg-info")]
        for name in files:
            path = Path(folder, name)
            try:
                text = path.read_text(errors="ignore")
            except OSError:
                continue
            offenders += [f"{path.relative_to(REPO)}: {bad}" for bad in _OUTSIDE if bad in text]
    assert not offenders, offenders
