"""The configuration file: good files load, bad files are refused with a clear message."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import yaml

from airflow_glidein.cli import main
from airflow_glidein.config import ConfigError, get_config, load_config
from tests.helpers import REPO, example_config

SECRET = "AKIA-very-secret-value-42"


def test_example_config_loads():
    cfg = load_config(REPO / "examples" / "glidein.yaml")
    assert [e.name for e in cfg.entries] == ["aws-us-east-1", "aws-us-west-2"]
    assert cfg.frontend("cms").entries == ["aws-us-east-1", "aws-us-west-2"]
    assert cfg.frontend("cms").demand.queue_file == str(REPO / "examples" / "queue.json")
    assert cfg.entry("aws-us-east-1").limits.batch_size == 5
    # defaults fill what the file leaves out
    assert cfg.entry("aws-us-west-2").policy.boot_timeout == 900


def test_policy_override_per_frontend():
    data = example_config()
    data["frontends"][0]["policy"] = {"max_lifetime": 600}
    from airflow_glidein.config import parse_config

    cfg = parse_config(data)
    assert cfg.policy_for(cfg.entry("aws-us-east-1"), "cms").max_lifetime == 600
    assert cfg.policy_for(cfg.entry("aws-us-east-1"), "cms").boot_timeout == 900
    assert cfg.policy_for(cfg.entry("aws-us-east-1"), None).max_lifetime == 43200


def _mutate(fn):
    data = example_config()
    fn(data)
    return data


BAD = {
    "unknown middleware": (
        lambda d: d["entries"][0].update(middleware="azure"),
        "entries[aws-us-east-1].middleware: unknown middleware; known: ec2, openstack, opennebula, htcondor_g",
    ),
    "cloud entry without image": (
        lambda d: d["entries"][1].pop("image"),
        "entries[aws-us-west-2]: a ec2 entry needs an image",
    ),
    "frontend names unknown entry": (
        lambda d: d["frontends"][0]["entries"].append("gcp-europe"),
        "frontend 'cms' names unknown entry 'gcp-europe'",
    ),
    "frontend names unknown credential": (
        lambda d: d["frontends"][0]["credentials"].append("azure-key"),
        "frontend 'cms' names unknown credential 'azure-key'",
    ),
    "negative limit": (
        lambda d: d["entries"][0]["limits"].update(max_pilots=-3),
        "entries[aws-us-east-1].limits.max_pilots: Input should be greater than or equal to 0",
    ),
    "match_expr does not parse": (
        lambda d: d["frontends"][0].update(match_expr="job.RequestCpus <= (glidein.Cpus"),
        "frontends[cms].match_expr: does not parse as a ClassAd expression",
    ),
    "entry requirements do not parse": (
        lambda d: d["entries"][1].update(requirements="TARGET.RequestMemory <=> 3 &&"),
        "entries[aws-us-west-2].requirements: does not parse as a ClassAd expression",
    ),
    "misspelt field": (
        lambda d: d["entries"][0]["limits"].update(max_pilot=5),
        "entries[aws-us-east-1].limits.max_pilot: unknown field",
    ),
    "missing factory": (lambda d: d.pop("factory"), "factory: required field is missing"),
    "duplicate entry": (
        lambda d: d["entries"].append(copy.deepcopy(d["entries"][0])),
        "duplicate entry name 'aws-us-east-1'",
    ),
    "bootstrap url not http": (
        lambda d: d["factory"].update(bootstrap_url="ftp://factory"),
        "factory.bootstrap_url: String should match pattern",
    ),
    "unknown credential type": (
        lambda d: d["credentials"][0].update(type="kerberos"),
        "credentials[aws-demo].type: unknown credential type; known: ec2_key_pair, idtoken",
    ),
    "unknown credential purpose": (
        lambda d: d["credentials"][0].update(purpose="payload"),
        "credentials[aws-demo].purpose: Input should be 'provision' or 'pilot'",
    ),
    "unknown auth method": (
        lambda d: d["entries"][0].update(auth_method="key_pair+magic"),
        "entries[aws-us-east-1].auth_method: part 2 of 2 is not a known auth method",
    ),
    "frontend demand without a source": (
        lambda d: d["frontends"][0].update(demand={"constraint": "true"}),
        "frontends[cms].demand: name a collector, schedds, or a queue_file",
    ),
    "bad entry name": (
        lambda d: d["entries"][0].update(name="aws us east"),
        "entries[0].name: String should match pattern",  # by index: the text is no name
    ),
    "secret pasted into a credential": (
        lambda d: d["credentials"][0].update(secret_access_key=SECRET),
        "credentials[aws-demo].secret_access_key: unknown field",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_is_refused_with_its_own_message(case, tmp_path, capsys):
    mutate, expected = BAD[case]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_mutate(mutate)))
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    text = str(exc.value)
    assert expected in text, text
    assert str(path) in text  # the message names the file
    assert SECRET not in text
    # the CLI prints the same, with no traceback, and exits non-zero
    assert main(["check-config", str(path)]) == 1
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and SECRET not in err


# A value pasted where it does not belong, or a number past its bound: the error has this exact shape
# and never holds the value. (mutation, the one problem reported, the value's text)
PASTED = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"  # no valid name: "/" and "+"
BIG = 2**63
UNECHOED = {
    "pasted text as an entry name": (
        lambda d: d["entries"][1].update(name=PASTED),
        "entries[1].name: String should match pattern '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$'", PASTED),
    "pasted text as a credential id": (
        lambda d: d["credentials"][1].update(id=PASTED),
        "credentials[1].id: String should match pattern '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$'", PASTED),
    "pasted text among a frontend's entries": (
        lambda d: d["frontends"][0]["entries"].append(PASTED),
        "frontends[cms].entries[2]: String should match pattern '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$'", PASTED),
    "pasted text as an auth method": (
        lambda d: d["entries"][0].update(auth_method=f"key_pair+{PASTED}"),
        "entries[aws-us-east-1].auth_method: parts 2, 3 of 3 are not known auth methods (parts are joined by "
        "'+'); known: app_credential, grid_proxy, idtoken, key_pair, scitoken, ssh_key, username_password, vm_id, "
        "vm_type", PASTED.split("+")[0]),
    "pasted text as a field name": (
        lambda d: d["entries"][0]["limits"].update({PASTED: 1}),
        "entries[aws-us-east-1].limits.(key 5): unknown field", PASTED),
    "cores past 1024": (
        lambda d: d["entries"][0].update(cores=BIG),
        "entries[aws-us-east-1].cores: Input should be less than or equal to 1024", str(BIG)),
    "memory past 16 TiB": (
        lambda d: d["entries"][0].update(memory_mb=BIG),
        "entries[aws-us-east-1].memory_mb: Input should be less than or equal to 16777216", str(BIG)),
    "gpus past 256": (
        lambda d: d["entries"][0].update(gpus=BIG),
        "entries[aws-us-east-1].gpus: Input should be less than or equal to 256", str(BIG)),
    "an infinite price": (
        lambda d: d["entries"][0].update(price=float("inf")),
        "entries[aws-us-east-1].price: Input should be a finite number", "inf"),
    "a price past a million per core-hour": (
        lambda d: d["entries"][0].update(price=float(BIG)),
        "entries[aws-us-east-1].price: Input should be less than or equal to 1000000", "9.223"),
    "an entry limit past 10,000,000": (
        lambda d: d["entries"][0]["limits"].update(max_pilots=BIG),
        "entries[aws-us-east-1].limits.max_pilots: Input should be less than or equal to 10000000", str(BIG)),
    "a frontend limit past 10,000,000": (
        lambda d: d["frontends"][0]["limits"].update(max_running=BIG),
        "frontends[cms].limits.max_running: Input should be less than or equal to 10000000", str(BIG)),
    "a factory total past 10,000,000": (
        lambda d: d["factory"].update(limits={"max_pilots": BIG}),
        "factory.limits.max_pilots: Input should be less than or equal to 10000000", str(BIG)),
    "an API budget past 10,000,000 requests": (
        lambda d: d["entries"][0].update(api_budget={"requests": BIG}),
        "entries[aws-us-east-1].api_budget.requests: Input should be less than or equal to 10000000", str(BIG)),
    "a timeout past 10 years": (
        lambda d: d["entries"][0]["policy"].update(boot_timeout=BIG),
        "entries[aws-us-east-1].policy.boot_timeout: Input should be less than or equal to 315360000", str(BIG)),
    "a frontend's policy override past 10 years": (
        lambda d: d["frontends"][0].update(policy={"max_lifetime": BIG}),
        "frontends[cms].policy.max_lifetime: Input should be less than or equal to 315360000", str(BIG)),
    "a request ttl past 10 years": (
        lambda d: d["frontends"][0].update(request_ttl=BIG),
        "frontends[cms].request_ttl: Input should be less than or equal to 315360000", str(BIG)),
    "an infinite fraction_running": (
        lambda d: d["frontends"][0]["limits"].update(fraction_running=float("inf")),
        "frontends[cms].limits.fraction_running: Input should be a finite number", "inf"),
    "an attribute no ClassAd holds": (
        lambda d: d["entries"][0]["attrs"].update(GLIDEIN_Max=BIG),
        "entries[aws-us-east-1].attrs: attribute GLIDEIN_Max is a number no ClassAd holds (a 64-bit integer, "
        "or a finite real)", str(BIG)),
}


@pytest.mark.parametrize("case", sorted(UNECHOED))
def test_values_are_never_echoed_and_numbers_have_bounds(case, tmp_path, capsys):
    mutate, expected, value = UNECHOED[case]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_mutate(mutate)))
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert exc.value.problems == [expected]
    assert value not in str(exc.value)
    assert main(["check-config", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"  - {expected}\n" in err and value not in err and "Traceback" not in err


def test_a_huge_number_no_longer_passes_check_config_and_crashes_plan(tmp_path, capsys):
    """Before bounds, cores: 2**63 passed check-config and plan died in classad2 with a SystemError."""
    data = _mutate(lambda d: d["entries"][0].update(cores=BIG))
    data["frontends"][0]["demand"]["queue_file"] = str(REPO / "examples" / "queue.json")
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["plan", str(path), "--queue", str(REPO / "examples" / "queue.json")]) == 1
    err = capsys.readouterr().err
    assert "entries[aws-us-east-1].cores: Input should be less than or equal to 1024" in err
    assert "Traceback" not in err and str(BIG) not in err


def test_bounds_leave_every_real_value_alone():
    data = _mutate(lambda d: d["entries"][0].update(cores=1024, memory_mb=16 * 1024 * 1024, gpus=256, price=0.034,
                                                    limits={"max_pilots": 10_000_000},
                                                    policy={"max_lifetime": 10 * 365 * 86400}))
    from airflow_glidein.config import parse_config

    entry = parse_config(data).entries[0]
    assert (entry.cores, entry.memory_mb, entry.gpus, entry.price) == (1024, 16777216, 256, 0.034)
    assert entry.limits.max_pilots == 10_000_000 and entry.policy.max_lifetime == 315360000


def test_distinct_messages():
    assert len({msg for _, msg in BAD.values()}) == len(BAD) >= 10


@pytest.mark.parametrize("text, expected", [
    ("factory: [unclosed\n", r"line 2, column 1: not valid YAML \(expected .,. or .\]., but got .<stream end>.\)"),
    ("- just\n- a list\n", "the file must hold a mapping"),
    ("", "the file must hold a mapping"),
])
def test_unparsable_files(text, expected, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(tmp_path / "nope.yaml")


def test_check_config_command_exits_cleanly(tmp_path):
    good = subprocess.run([sys.executable, "-m", "airflow_glidein", "check-config", str(REPO / "examples" / "glidein.yaml")],
                          capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert "configuration OK" in good.stdout and "aws-us-east-1: ec2" in good.stdout
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_mutate(BAD["negative limit"][0])))
    bad = subprocess.run([sys.executable, "-m", "airflow_glidein", "check-config", str(path)],
                         capture_output=True, text=True)
    assert bad.returncode == 1
    assert "max_pilots" in bad.stderr and "Traceback" not in bad.stderr + bad.stdout


def test_config_is_reread_when_the_file_changes(tmp_path):
    path = tmp_path / "c.yaml"
    data = example_config()
    path.write_text(yaml.safe_dump(data))
    assert get_config(str(path)).entries[0].limits.max_pilots == 20
    data["entries"][0]["limits"]["max_pilots"] = 33
    path.write_text(yaml.safe_dump(data) + "\n# changed\n")
    assert get_config(str(path)).entries[0].limits.max_pilots == 33
