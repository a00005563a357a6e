"""A middleware is one module: its description (airflow_glidein.middlewares) is what configuration
validation, provider info, credentials, UserData and preflight read, and a middleware installed beside
the package (entry point group airflow_glidein.middlewares) is picked up by all of them.

The added middleware is tests/loopback_cloud.py, registered here the way an installed distribution
registers it: a dist-info folder on sys.path whose entry_points.txt names it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from airflow_glidein import middlewares, preflight, userdata
from airflow_glidein.config import ConfigError, load_config
from airflow_glidein.hooks.base import PilotHook
from tests.helpers import POOL_TOKEN, idle_jobs, run_dag, task_states, write_config, write_queue, xcom
from tests.loopback_cloud import LoopbackCloud

TOKEN = "loopback-token-7d1f0c2a9e"


def install(site, **entry_points: str) -> None:
    dist = site / "airflow_glidein_loopback-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: airflow-glidein-loopback\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[airflow_glidein.middlewares]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """The loopback middleware installed, as a distribution's entry point."""
    install(tmp_path / "site", loopback="tests.loopback_cloud:MIDDLEWARE")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    middlewares.reload()
    yield
    middlewares.reload()  # read again, without it, on next use


@pytest.fixture
def cloud(monkeypatch):
    cloud = LoopbackCloud(TOKEN, max_instances=20).start()
    monkeypatch.setenv("AIRFLOW_CONN_LOOPBACK_TEST", cloud.connection_json())
    monkeypatch.setenv("AIRFLOW_CONN_GLIDEIN_CMS_POOL_TOKEN",
                       json.dumps({"conn_type": "generic", "password": POOL_TOKEN}))
    yield cloud
    cloud.stop()


def loopback_config(queue: str = "queue.json", **entry: object) -> dict:
    return {
        "factory": {"name": "loop-factory", "bootstrap_url": "http://127.0.0.1:9/glidein", "retries": 0},
        "entries": [{"name": "loopback-a", "middleware": "loopback", "image": "img-pilot", "flavor": "small",
                     "cores": 2, "memory_mb": 4096, "attrs": {"GLIDEIN_Site": "LOOPBACK"}, "trust_domain": "loop",
                     "auth_method": "loopback_token", "options": {"zone": "b", "max_per_call": 2},
                     "limits": {"max_pilots": 10, "max_idle": 10, "max_per_cycle": 10, "batch_size": 5}, **entry}],
        "frontends": [{"name": "cms", "schedule": None, "demand": {"queue_file": queue},
                       "match_expr": "stringListMember(glidein.GLIDEIN_Site, job.DESIRED_Sites)",
                       "entries": ["loopback-a"], "credentials": ["loop-cms", "loop-pool"]}],
        "credentials": [
            {"id": "loop-cms", "type": "loopback_token", "conn_id": "loopback_test", "trust_domain": "loop",
             "purpose": "provision"},
            {"id": "loop-pool", "type": "idtoken", "conn_id": "glidein_cms_pool_token", "trust_domain": "loop",
             "purpose": "pilot"},
        ],
    }


def refusal(tmp_path, data: dict) -> str:
    path = tmp_path / "glidein.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    return str(exc.value)


def test_a_middleware_added_in_one_module_runs_a_factory_cycle(airflow_db, installed, cloud, tmp_path, monkeypatch):
    queue = write_queue(tmp_path, idle_jobs(6, "LOOPBACK", cpus=2))  # six pilots of 2 cores
    write_config(tmp_path, loopback_config(queue), monkeypatch)

    fe = run_dag("glidein_frontend_cms")
    assert str(fe.state) == "success", task_states(fe)
    assert xcom(fe, "plan_pilots")["entries"]["loopback-a"]["idle"] == 6

    fa = run_dag("glidein_factory")
    assert str(fa.state) == "success", task_states(fa)
    live = cloud.live()
    assert len(live) == 6
    for inst in live:  # our ids, the entry's options, and a signed envelope for this entry
        assert (inst["tags"]["glidein:factory"], inst["tags"]["glidein:entry"]) == ("loop-factory", "loopback-a")
        assert inst["zone"] == "b" and inst["flavor"] == "small"
        assert userdata.parse(inst["userdata"])["entry"] == "loopback-a"
    # two launches (batch_size 5: 5 + 1), each created max_per_call (2) at a time: 3 + 1 create calls
    assert sum(call == ("POST", "/instances") for call in cloud.calls) == 4
    assert TOKEN not in json.dumps(xcom(fa, "report"))

    # the next cycle lists them by tag and launches nothing
    again = run_dag("glidein_factory")
    assert str(again.state) == "success", task_states(again)
    assert xcom(again, "plan_cycle") == []
    assert xcom(again, "inventory")["counts"]["loopback-a"]["cms"]["booting"] == 6
    assert len(cloud.live()) == 6 and sum(call == ("POST", "/instances") for call in cloud.calls) == 4


def test_configuration_validation_reads_the_middlewares_description(installed, tmp_path):
    path = write_config(tmp_path, loopback_config(options={"zone": "c"}))
    entry = load_config(path).entries[0]
    assert entry.options == {"zone": "c", "max_per_call": 5}  # the schema's defaults filled in

    misspelt = refusal(tmp_path, loopback_config(options={"zone": "b", "max_per_cal": 3}))
    assert "entries[loopback-a].options.max_per_cal: unknown field" in misspelt
    bounded = refusal(tmp_path, loopback_config(options={"max_per_call": 0}))
    assert "entries[loopback-a].options.max_per_call: Input should be greater than 0" in bounded

    # a provisioning credential the entry's middleware cannot use, though its trust domain and auth method fit
    data = loopback_config(auth_method="loopback_token+username_password")
    data["credentials"].append({"id": "one-cms", "type": "opennebula_password", "conn_id": "one_secret_conn",
                                "trust_domain": "loop", "purpose": "provision"})
    wrong = refusal(tmp_path, data)
    assert ("credential 'one-cms' (opennebula_password) cannot provision on entry 'loopback-a': "
            "the loopback middleware takes loopback_token") in wrong
    assert "one_secret_conn" not in wrong


def test_built_in_options_are_checked_and_a_wrong_credential_type_refused(tmp_path):
    data = loopback_config(middleware="openstack", auth_method="username_password", options={"netwrok": "n1"})
    data["credentials"][0].update(type="opennebula_password")
    text = refusal(tmp_path, data)
    assert "entries[loopback-a].options.netwrok: unknown field" in text
    data["entries"][0]["options"] = {"network": "n1"}
    text = refusal(tmp_path, data)
    assert ("credential 'loop-cms' (opennebula_password) cannot provision on entry 'loopback-a': the openstack "
            "middleware takes openstack_app_credential, openstack_password") in text
    data["credentials"][0].update(type="openstack_password")
    assert load_config(write_config(tmp_path, data)).entries[0].options["multi_create"] is True


def test_without_its_entry_point_the_middleware_is_unknown(tmp_path):
    middlewares.reload()
    text = refusal(tmp_path, loopback_config())
    assert "entries[loopback-a].middleware: unknown middleware; known: ec2, openstack, opennebula, htcondor_g" in text
    assert "credentials[loop-cms].type: unknown credential type; known:" in text


def test_a_broken_installed_middleware_is_named_and_hides_no_other(tmp_path, monkeypatch):
    install(tmp_path / "site", loopback="tests.loopback_cloud:MIDDLEWARE", broken="tests.no_such_module:MIDDLEWARE",
            misnamed="tests.loopback_cloud:MIDDLEWARE")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    middlewares.reload()
    try:
        assert middlewares.get("loopback").name == "loopback"
        with pytest.raises(middlewares.Unknown, match="broken = tests.no_such_module:MIDDLEWARE cannot be loaded "
                                                     r"\(ModuleNotFoundError"):
            middlewares.get("broken")
        with pytest.raises(middlewares.Unknown, match="describes a middleware named 'loopback'"):
            middlewares.get("misnamed")
        assert middlewares.names() == ["ec2", "openstack", "opennebula", "htcondor_g", "loopback"]
    finally:
        middlewares.reload()


def test_provider_info_and_connection_test_pick_it_up(installed, cloud):
    from airflow_glidein.get_provider_info import get_provider_info

    info = get_provider_info()
    assert "tests.loopback_cloud" in info["hooks"][0]["python-modules"]
    form = next(c for c in info["connection-types"] if c["connection-type"] == "loopback_cloud")
    module, _, name = form["hook-class-name"].rpartition(".")
    hook_class = getattr(__import__(module, fromlist=[name]), name)
    assert hook_class.conn_type == "loopback_cloud"
    # the "Test" button reads the connection as the credential type the middleware declares for it
    ok, message = hook_class(glidein_credential_conn_id="loopback_test").test_connection()
    assert ok and message == f"loopback_token: does not expire; cloud={cloud.url}"
    assert TOKEN not in message


def test_airflows_providers_manager_registers_its_connection_type(tmp_path, airflow_db):
    """In a fresh process (the providers manager reads provider info once per process)."""
    from tests.helpers import REPO

    install(tmp_path / "site", loopback="tests.loopback_cloud:MIDDLEWARE")
    code = ("from airflow.providers_manager import ProvidersManager; "
            "hook = ProvidersManager().hooks['loopback_cloud']; print('HOOK', hook.hook_class_name, hook.package_name)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(REPO)])}
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=300)
    found = [line.split()[1:] for line in out.stdout.splitlines() if line.startswith("HOOK ")]
    assert found == [["tests.loopback_cloud.LoopbackCredentialHook", "airflow-glidein"]], out.stderr[-2000:]


def test_preflight_runs_the_middlewares_checks(installed, cloud, tmp_path):
    cloud.max_instances = 3
    data = loopback_config()
    data["entries"].append({**data["entries"][0], "name": "loopback-b", "image": "img-gone", "flavor": "large",
                            "cores": 16})
    config = load_config(write_config(tmp_path, data))
    checks = {(c.scope, c.what): (c.ok, c.detail) for c in preflight.run(config)}
    assert checks[("credential loop-cms", "connection readable, credential valid")][0]
    assert checks[("entry loopback-a", "provider answers via loop-cms")] == (
        True, f"the loopback cloud at {cloud.url} answers")
    assert checks[("entry loopback-a", "quota headroom via loop-cms")] == (True, "instances 3 left: room for 3 pilots")
    assert checks[("entry loopback-a", "image img-pilot via loop-cms")] == (True, "exists")
    assert checks[("entry loopback-a", "flavor small via loop-cms")] == (True, "2 cores, 4096 MB")
    ok, detail = checks[("entry loopback-b", "image img-gone via loop-cms")]
    assert not ok and "404 no such image" in detail
    ok, detail = checks[("entry loopback-b", "flavor large via loop-cms")]
    assert not ok and "less than the entry's 16 cores" in detail


def test_the_userdata_limit_is_the_middlewares(installed):
    key = userdata.generate_key()
    payload = {"launch_id": "l.0", "bootstrap_url": "http://127.0.0.1/glidein", "note": "x" * 3000}
    assert len(userdata.build("ec2", payload, key)) < 16384
    with pytest.raises(userdata.UserDataTooLarge, match="over the loopback limit of 4096 bytes"):
        userdata.build("loopback", payload, key)


def test_each_built_in_description_names_its_hook():
    for m in middlewares.all_middlewares():
        hook = m.hook_class()
        assert issubclass(hook, PilotHook) and hook.middleware == m.name
        assert m.conn_types  # the connection types its provisioning credentials live in


def test_configuration_of_built_in_middlewares_stays_cheap():
    """Reading a configuration of built-in middlewares imports no hook and scans no installed package."""
    code = ("import sys; from airflow_glidein import config, middlewares; "
            "config.load_config('examples/glidein.yaml'); "
            "print(middlewares._installed.cache_info().currsize, "
            "any(m.startswith(('airflow_glidein.hooks', 'airflow.')) or m == 'airflow' for m in sys.modules))")
    from tests.helpers import REPO

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split() == ["0", "False"]
