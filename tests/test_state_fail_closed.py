"""The state store fails closed: a configured store that cannot be read or reached fails the task and
preflight, naming the connection (never a secret); the SQLite file is private and for one machine only."""

from __future__ import annotations

import logging
import os
import stat

import pytest

from airflow_glidein import state
from airflow_glidein.bootstrap import keys

SECRET = "s3cret-pw"


@pytest.fixture
def resolving(monkeypatch, tmp_path):
    """The store as a deployment resolves it: no GLIDEIN_STATE_URL, AIRFLOW_HOME = tmp_path, nothing resolved."""
    monkeypatch.delenv("GLIDEIN_STATE_URL")
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    for var in ("AIRFLOW__GLIDEIN__STATE_CONN_ID", "AIRFLOW_CONN_GLIDEIN_STATE", "AIRFLOW__CORE__EXECUTOR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(state, "_resolved", None)
    state._store.cache_clear()
    yield tmp_path
    state._store.cache_clear()


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _refused(match: str) -> str:
    with pytest.raises(state.StateStoreError, match=match) as err:
        state.store()
    assert SECRET not in str(err.value)
    return str(err.value)


def test_without_a_connection_it_is_a_private_sqlite_file_in_airflow_home(resolving):
    st = state.store()
    path = resolving / "glidein_state.db"
    assert st.url == f"sqlite:///{path}" and st.revision == state.head()
    keys.signing_key(st)  # a generated signing key now lies in it
    assert _mode(path) == 0o600
    assert _mode(f"{path}-wal") == 0o600  # SQLite gives its journal the file's mode


def test_an_older_sqlite_file_readable_by_others_is_made_private(resolving, caplog):
    path = resolving / "glidein_state.db"
    path.touch(mode=0o644)
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING, logger="airflow_glidein.state"):
        state.store()
    assert _mode(path) == 0o600
    assert "readable by others: now mode 0600" in caplog.text


def test_a_named_connection_that_does_not_exist_fails(resolving, monkeypatch):
    monkeypatch.setenv("AIRFLOW__GLIDEIN__STATE_CONN_ID", "glidein_state_prod")
    msg = _refused("does not exist")
    assert "'glidein_state_prod' ([glidein] state_conn_id)" in msg
    assert not list(resolving.glob("glidein_state.db*"))  # no fallback store


def test_a_present_connection_that_cannot_be_read_fails_without_fallback(resolving, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_GLIDEIN_STATE", f'{{"conn_type": "postgres", "password": "{SECRET}",')
    msg = _refused("cannot be read")
    assert "connection 'glidein_state'" in msg and "EnvironmentVariablesBackend" in msg
    assert not list(resolving.glob("glidein_state.db*"))


def test_an_unreachable_store_fails_naming_the_connection(resolving, monkeypatch):
    from tests.pg import free_port

    monkeypatch.setenv("AIRFLOW_CONN_GLIDEIN_STATE", f"postgresql://glidein:{SECRET}@127.0.0.1:{free_port()}/state")
    msg = _refused("cannot be reached")
    assert "connection 'glidein_state'" in msg and "glidein:***@127.0.0.1" in msg and "refused" in msg
    assert not list(resolving.glob("glidein_state.db*"))


@pytest.mark.parametrize("executor", ["CeleryExecutor", "KubernetesExecutor", "LocalExecutor,CeleryExecutor",
                                      "airflow.providers.edge3.executors.EdgeExecutor"])
def test_a_distributed_executor_without_a_store_connection_is_refused(resolving, monkeypatch, executor):
    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", executor)
    msg = _refused("one machine only")
    assert "runs tasks on several machines" in msg and "Create connection 'glidein_state'" in msg
    assert not list(resolving.glob("glidein_state.db*"))


def test_a_local_executor_keeps_the_sqlite_file(resolving, monkeypatch):
    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", "LocalExecutor")
    assert state.store().url.startswith("sqlite:///")


def test_a_distributed_executor_with_a_store_connection_runs(resolving, monkeypatch, pg_state_url):
    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", "CeleryExecutor")
    monkeypatch.setenv("AIRFLOW_CONN_GLIDEIN_STATE", pg_state_url.replace("postgresql+psycopg2://", "postgresql://"))
    st = state.store()
    assert st.engine.dialect.name == "postgresql" and st.revision == state.head()
    st.engine.dispose()


def test_the_url_is_resolved_once_per_process(resolving, monkeypatch):
    first = state.default_url()
    monkeypatch.setenv("AIRFLOW_CONN_GLIDEIN_STATE", f"postgresql://glidein:{SECRET}@127.0.0.1:1/state")
    assert state.default_url() == first
    assert state.store().url == first


def test_preflight_refuses_to_run_and_says_why(resolving, monkeypatch, capsys):
    from airflow_glidein import cli

    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", "CeleryExecutor")
    assert cli.main(["preflight"]) == 1  # [glidein] config_file: the example; no provider is asked
    out = capsys.readouterr().out
    assert "state store" in out and "FAILED" in out and "CeleryExecutor" in out
    assert "1 checks, 1 failed" in out


@pytest.mark.usefixtures("airflow_db")
def test_a_task_whose_store_cannot_be_reached_fails_naming_it(resolving, monkeypatch, ec2, tmp_path, capfd):
    from tests.helpers import example_config, run_dag, task_states, write_config

    cfg = example_config()
    cfg["factory"].update(retries=0)
    write_config(tmp_path, cfg, monkeypatch)
    monkeypatch.setenv("AIRFLOW_CONN_GLIDEIN_STATE", f"postgresql://glidein:{SECRET}@127.0.0.1:1/state")
    run = run_dag("glidein_factory")
    assert str(run.state) == "failed", task_states(run)
    out = "".join(capfd.readouterr())
    assert "glidein state store (connection 'glidein_state', postgresql://glidein:***@127.0.0.1:1/state) " \
           "cannot be reached" in out
    assert SECRET not in out
