"""glideinWMS import: configurations of our own in glideinWMS's documented format (tests/fixtures/gwms/),
imported, checked, and planned; every pilot count below is worked by hand from our planning formulas."""

from __future__ import annotations

import json
from pathlib import Path

import classad2
import pytest
import yaml

from airflow_glidein import cli
from airflow_glidein.config import load_config
from airflow_glidein.gwms_import import GwmsImportError, import_gwms, translate_match

FIX = Path(__file__).parent / "fixtures" / "gwms"
FRONTEND, FACTORY, QUEUE = FIX / "frontend.xml", FIX / "glideinWMS.xml", FIX / "queue.json"
EC2, CE, CE2 = "AWS_us-east-1_m5.xlarge", "US_CE_ce.example.edu", "US_CE2_ce2.example.edu"


def line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


@pytest.fixture
def imported(tmp_path, capsys):
    out = tmp_path / "glidein.yaml"
    assert cli.main(["import-gwms", "--frontend", str(FRONTEND), "--factory", str(FACTORY), "-o", str(out)]) == 0
    return out, capsys.readouterr().err


def test_import_check_config_and_plan_give_the_hand_worked_pilots(imported, capsys):
    out, _ = imported
    assert cli.main(["check-config", str(out)]) == 0
    assert "configuration OK" in capsys.readouterr().out
    assert cli.main(["plan", str(out), "--queue", str(QUEUE), "--json"]) == 0
    plans = json.loads(capsys.readouterr().out)
    cpu, mcore = plans["vo-frontend-cpu"]["entries"], plans["vo-frontend-mcore"]["entries"]

    # The queue: 90 one-core 2000 MB jobs for AWS_US_EAST_1 or US_CE (idle 10 min or more), 30 one-core jobs for
    # US_CE only (new), 10 four-core 8000 MB jobs for AWS_US_EAST_1 (old). No pilots yet (have = 0).
    # Group cpu (ramp_up_attenuation 3 and reserve 5: glideinWMS's defaults, written by the import):
    #   EC2, 4 cores / 15000 MB (GLIDEIN_CPUS, GLIDEIN_MaxMemMBs): the 90 shared jobs count 1/2 each -> 45 jobs,
    #   4 per pilot (min(4/1 cores, 15000/2000 memory)) = 11.25 pilots; the 10 four-core jobs 1 per pilot = 10;
    #   wanted = ceil(21.25) = 22, all old -> wanted_old = 22.
    #   room: max_idle_per_entry = min(idle_glideins_per_entry 100, idle_vms_per_entry 100, the factory's per-frontend
    #   idle 40) = 40; new = min(22, 40) = 22.
    #   add = int(22 / 3) + min(22 // 3, 5) = 7 + 5 = 12 (<= 22); no curb reached (0 idle pilots) -> level 12.
    #   max running = min(100, int((22 + 0 busy) x 1.15 + 1)) = int(26.3) = 26.
    assert (cpu[EC2]["idle"], cpu[EC2]["max_running"], cpu[EC2]["why"]["wanted"]) == (12, 26, 22)
    #   CE, 8 cores / 32000 MB: 45 shared jobs / 8 per pilot = 5.625, 30 US_CE-only jobs / 8 = 3.75;
    #   wanted = ceil(9.375) = 10, wanted_old = ceil(5.625) = 6.
    #   add = int(10 / 3) + min(6 // 3, 5) = 3 + 2 = 5 -> level 5; max running = int(10 x 1.15 + 1) = 12.
    assert (cpu[CE]["idle"], cpu[CE]["max_running"], cpu[CE]["why"]["wanted"]) == (5, 12, 10)
    assert cpu[EC2]["why"]["bound_by"] == cpu[CE]["why"]["bound_by"] == "ramp_up_attenuation 3"
    # Group mcore (ramp_up_attenuation 2, idle_glideins_per_entry max 8 reserve 2): its match keeps
    # job.RequestCpus >= 4 (the .startswith conjunct is left out and listed), and its credentials reach EC2 only.
    #   10 four-core jobs, 1 per pilot -> wanted 10, old 10; new = min(10, max_idle_per_entry 8) = 8;
    #   add = int(8 / 2) + min(10 // 3, 2) = 4 + 2 = 6 -> level 6; max running = int(10 x 1.15 + 1) = 12.
    #   CE2 (1 core): no job lists its site US_CE2 -> wanted 0, level 0, max running 0 (no busy pilots).
    assert (cpu[CE2]["idle"], cpu[CE2]["max_running"], cpu[CE2]["why"]["wanted"]) == (0, 0, 0)
    assert list(mcore) == [EC2]  # CE2's 1 core fails mcore's factory query_expr GLIDEIN_CPUS >= 4
    assert (mcore[EC2]["idle"], mcore[EC2]["max_running"], mcore[EC2]["why"]["wanted"]) == (6, 12, 10)


def test_entries_credentials_and_limits_carry_glideinwms_values(imported):
    out, err = imported
    cfg = load_config(out)
    ec2, ce = cfg.entry(EC2), cfg.entry(CE)
    # EC2: region and endpoint from the gatekeeper, image from the credential's vm_id (auth key_pair+vm_id: the VO
    # brings it), flavor from vm_type, size from GLIDEIN_CPUS / GLIDEIN_MaxMemMBs, limits from max_jobs and submit
    assert (ec2.middleware, ec2.region, ec2.endpoint) == ("ec2", "us-east-1", "ec2.us-east-1.amazonaws.com")
    assert (ec2.image, ec2.allow_vo_image, ec2.flavor, ec2.cores, ec2.memory_mb) == (
        "ami-0123456789abcdef0", True, "m5.xlarge", 4, 15000)
    assert ec2.limits.model_dump() == {"max_pilots": 200, "max_idle": 50, "max_per_cycle": 20, "batch_size": 5}
    assert ec2.options == {"key_name": "hepcloud", "spot": True, "spot_max_price": 0.1, "subnet_id": "subnet-0abc",
                           "security_group_ids": ["sg-1", "sg-2"]}
    assert (ec2.policy.max_lifetime, ec2.policy.retire_window) == (79200, 86400 - 79200)
    assert (ec2.trust_domain, ec2.auth_method) == ("HEPCloud_AWS", "key_pair+vm_id")
    assert ec2.attrs["GLIDEIN_Supported_VOs"] == "CMS,Fermilab" and ec2.attrs["GLIDEIN_CPUS"] == 4
    # HTCondor-CE: htcondor_g with the grid resource, the factory's first schedd; limits are glideinWMS's defaults
    assert (ce.middleware, ce.options["grid_resource"]) == ("htcondor_g", "condor ce.example.edu ce.example.edu:9619")
    assert ce.options["schedd"] == "schedd_glideins2@factory.example.org"
    assert ce.limits.model_dump() == {"max_pilots": 10000, "max_idle": 2000, "max_per_cycle": 100, "batch_size": 10}
    assert ce.requirements == "TARGET.RequestMemory <= 4000 * MY.Cpus"  # GLIDEIN_Entry_Start
    assert [e.name for e in cfg.entries] == [EC2, CE, CE2]  # the gce entry is not imported
    assert cfg.entry(CE2).requirements is None  # its $() macro start expression is left out, and listed

    cpu = cfg.frontend("vo-frontend-cpu")
    assert cpu.match_expr == ("stringListMember(glidein.GLIDEIN_Site, job.DESIRED_Sites) && "
                              "ifThenElse(isUndefined(job.RequestCpus), 1, job.RequestCpus) <= glidein.Cpus")
    assert cpu.start_expr == "TARGET.RequestCpus <= MY.Cpus"
    assert cpu.demand.collector == "pool.example.org:9618" and cpu.demand.schedds == ["schedd_jobs1@submit.example.org"]
    assert cpu.demand.constraint == "(JobUniverse==5)&&(GLIDEIN_Is_Monitor =!= TRUE)"
    assert cpu.schedule == "*/2 * * * *"  # loop_delay 120
    assert cpu.limits.model_dump() == {
        "max_running": 100000, "max_idle": 1000, "max_running_per_entry": 100, "max_idle_per_entry": 40,
        "curb_idle_per_entry": 5, "curb_idle": 200, "curb_running": 90000, "reserve_idle": 5,
        "ramp_up_attenuation": 3.0, "fraction_running": 1.15}
    mcore = cfg.frontend("vo-frontend-mcore")
    assert mcore.match_expr == "job.RequestCpus >= 4"
    assert mcore.demand.constraint == "((JobUniverse==5)&&(GLIDEIN_Is_Monitor =!= TRUE)) && (RequestCpus >= 4)"
    assert (mcore.limits.ramp_up_attenuation, mcore.limits.max_idle, mcore.limits.curb_idle) == (2.0, 400, 50)
    assert cfg.factory.limits.max_pilots == 5000  # the frontend's running_glideins_total over all groups
    assert cfg.factory.collector == "pool.example.org:9618"

    creds = {c.id: c for c in cfg.credentials}
    assert {(c.type, c.trust_domain, c.purpose) for c in creds.values()} == {
        ("ec2_key_pair", "HEPCloud_AWS", "provision"), ("scitoken", "grid", "provision"),
        ("idtoken", "HEPCloud_AWS", "pilot"), ("idtoken", "grid", "pilot")}
    assert sorted(cpu.credentials) == sorted(creds)
    assert "vo-frontend-ce_token" not in mcore.credentials  # a group's credentials stay in its group
    text = out.read_text()
    for conn in ("glidein_vo_frontend_aws_cms", "glidein_vo_frontend_ce_token", "glidein_vo_frontend_pool_token"):
        assert f"#   {conn}: " in text  # the connections to create, named at the top of the file


def test_what_is_not_translated_is_listed_with_its_line(imported):
    out, err = imported
    text = out.read_text()
    startswith = line_of(FRONTEND, '.startswith("AWS")')
    gce = line_of(FACTORY, 'name="GOOGLE_us-central1-a"')
    zone = line_of(FACTORY, "ec2_availability_zone")
    macro = line_of(FACTORY, "$(GLIDEIN_Site_Start)")
    for expected in (f"frontend.xml:{startswith}: group mcore match_expr "
                     "`glidein[\"attrs\"][\"GLIDEIN_Site\"].startswith(\"AWS\")`",
                     f"glideinWMS.xml:{gce}: entry GOOGLE_us-central1-a: grid type 'gce'",
                     f"glideinWMS.xml:{zone}: entry {EC2} submit_attr ec2_availability_zone",
                     f"glideinWMS.xml:{macro}: entry {CE2} GLIDEIN_Entry_Start: does not parse"):
        assert expected in err and expected in text
    assert "bootstrap_url" in err  # the placeholder to fill in is named


@pytest.mark.parametrize(("python", "classad"), [
    ("True", "true"),
    ('job["Owner"] == "alice" or job["Owner"] == "bob"', '(job.Owner == "alice" || job.Owner == "bob")'),
    ('glidein["attrs"]["GLIDEIN_Site"] in ("A", "B")', '(glidein.GLIDEIN_Site == "A" || glidein.GLIDEIN_Site == "B")'),
    ('glidein["attrs"]["GLIDEIN_Site"] not in job["Sites"].split(",")',
     "!stringListMember(glidein.GLIDEIN_Site, job.Sites)"),
    ('int(glidein["attrs"]["GLIDEIN_CPUS"]) >= job.get("RequestCpus", 1)',
     "int(glidein.GLIDEIN_CPUS) >= ifThenElse(isUndefined(job.RequestCpus), 1, job.RequestCpus)"),
    ('not (job["RequestMemory"] > 2 * glidein["params"]["Mem"])', "!(job.RequestMemory > (2 * glidein.Mem))"),
    ('1 < job["N"] <= 5', "(1 < job.N && job.N <= 5)"),
])
def test_simple_python_translates(python, classad):
    assert translate_match(python) == (classad, [])


def test_translation_agrees_with_python_on_values():
    """The ClassAd form evaluates as glideinWMS's Python does, on jobs and entries that differ."""
    expr = ('glidein["attrs"]["GLIDEIN_Site"] in job["DESIRED_Sites"].split(",") and '
            'job.get("RequestCpus", 1) <= getGlideinCpusNum(glidein) and job["RequestMemory"] / 2 < 2000')
    text, left_out = translate_match(expr)
    assert not left_out
    jobs = [{"DESIRED_Sites": "A,B", "RequestCpus": 4, "RequestMemory": 3000},
            {"DESIRED_Sites": "B", "RequestMemory": 3999}, {"DESIRED_Sites": "A", "RequestMemory": 4000},
            {"DESIRED_Sites": "C", "RequestCpus": 1, "RequestMemory": 10}]
    glideins = [{"GLIDEIN_Site": "A", "Cpus": 4}, {"GLIDEIN_Site": "B", "Cpus": 2}]
    for job in jobs:
        for attrs in glideins:
            expected = eval(expr, {"job": job, "glidein": {"attrs": attrs},  # noqa: S307 - the test's own input
                                   "getGlideinCpusNum": lambda g: g["attrs"]["Cpus"]})
            ad = classad2.ClassAd()
            ad["job"], ad["glidein"] = classad2.ClassAd(job), classad2.ClassAd(attrs)
            ad["__m"] = classad2.ExprTree(text)
            assert ad.eval("__m") is expected, (job, attrs)


@pytest.mark.parametrize("python", [
    'job["Sites"].lower() == "a"',  # method calls
    '"T2" in job["DESIRED_Sites"]',  # a substring test
    'glidein["attrs"]["X"] in [s for s in job["L"]]',
    'job["Owner"] is None',
    "job[attr] == 1",  # a computed attribute name
])
def test_untranslatable_python_is_left_out_and_named(python):
    text, left_out = translate_match(f'job["A"] == 1 and {python}')
    assert text == "job.A == 1"  # the rest of the match stays: wider, never narrower
    assert [src for src, _ in left_out] == [python]


def test_defaults_and_config_d(tmp_path, capsys):
    """A bare configuration gets glideinWMS's defaults written out, and factory config.d/*.xml is read (sorted)."""
    (tmp_path / "config.d").mkdir()
    (tmp_path / "frontend.xml").write_text(
        '<frontend frontend_name="fe">\n<match><job><schedds><schedd fullname="s@h"/></schedds></job></match>\n'
        '<security><credentials>\n<credential absfname="/p" type="grid_proxy" trust_domain="grid"/>\n'
        '<credential absfname="/q" type="grid_proxy"/>\n</credentials></security>\n'
        '<groups><group name="main"/></groups><collectors><collector node="cm:9618"/></collectors></frontend>\n')
    (tmp_path / "glideinWMS.xml").write_text(
        '<glidein factory_name="f"><attrs><attr name="GLIDEIN_Start" value="TARGET.RequestMemory &lt;= 8000"/></attrs>'
        '<entries>\n<entry name="CE1" gatekeeper="ce1 ce1:9619"/>\n</entries></glidein>\n')
    (tmp_path / "config.d" / "sites.xml").write_text(
        '<glidein><entries>\n<entry name="CE2" gatekeeper="ce2 ce2:9619" gridtype="nordugrid"/>\n'
        '<entry name="HPC" gatekeeper="vo@login.hpc.edu" gridtype="batch slurm"/>\n'
        '<entry name="BOSCO" gatekeeper="vo@login.hpc.edu" gridtype="batch slurm" auth_method="key_pair"/>\n'
        '</entries></glidein>\n')
    out = tmp_path / "glidein.yaml"
    assert cli.main(["import-gwms", "--frontend", str(tmp_path / "frontend.xml"),
                     "--factory", str(tmp_path / "glideinWMS.xml"), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    cfg = load_config(out)
    fe = cfg.frontend("fe-main")
    assert fe.limits.model_dump() == {
        "max_running": 100000, "max_idle": 1000, "max_running_per_entry": 5000, "max_idle_per_entry": 100,
        "curb_idle_per_entry": 5, "curb_idle": 200, "curb_running": 90000, "reserve_idle": 5,
        "ramp_up_attenuation": 3.0, "fraction_running": 1.15}
    assert fe.demand.constraint == "(JobUniverse==5)&&(GLIDEIN_Is_Monitor =!= TRUE)&&(JOB_Is_Monitor =!= TRUE)"
    assert fe.schedule == "* * * * *"  # loop_delay 60
    ce1, ce2 = cfg.entry("CE1"), cfg.entry("CE2")
    assert (ce1.options["grid_resource"], ce2.options["grid_resource"]) == ("condor ce1 ce1:9619", "arc ce2 ce2:9619")
    assert cfg.entry("HPC").options["grid_resource"] == "batch slurm vo@login.hpc.edu"
    assert "BOSCO" not in {e.name for e in cfg.entries}  # its key_pair is an SSH key: named, not imported
    assert "sites.xml:4: entry BOSCO: a batch (BOSCO) entry's key_pair is an SSH key" in err
    assert ce1.limits.model_dump() == {"max_pilots": 10000, "max_idle": 2000, "max_per_cycle": 100, "batch_size": 10}
    assert ce1.requirements == ce2.requirements == "TARGET.RequestMemory <= 8000"  # the factory's GLIDEIN_Start
    assert (ce1.trust_domain, ce1.auth_method) == ("grid", "grid_proxy")  # the factory's defaults
    # the second credential takes the frontend's default trust domain "OSG", which no entry has (the factory's
    # default is "grid"): it is named as unused rather than silently matched
    assert [c.trust_domain for c in cfg.credentials if c.purpose == "provision"] == ["grid"]
    assert "frontend.xml:5: credential fe-q: usable on none of group main's entries" in err
    assert "no GLIDEIN_CPUS" in err  # the pilot size planning assumes is named


@pytest.mark.parametrize(("text", "expected"), [
    ("<frontend>\n<groups>\n</frontend>\n", "frontend.xml:3: not well-formed XML (mismatched tag)"),
    ("<glidein/>\n", "the root element is <glidein>, not a glideinWMS <frontend>"),
])
def test_bad_files_are_named_with_the_line(tmp_path, text, expected):
    (tmp_path / "frontend.xml").write_text(text)
    with pytest.raises(GwmsImportError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        import_gwms(tmp_path / "frontend.xml", FACTORY)


def test_the_yaml_round_trips(imported):
    out, _ = imported
    data = yaml.safe_load(out.read_text())
    assert {f["name"] for f in data["frontends"]} == {"vo-frontend-cpu", "vo-frontend-mcore"}


def test_a_note_with_a_newline_stays_a_comment(tmp_path, capsys):
    """XML keeps a newline written as &#10;: the listed conjunct must not break out of the YAML comment."""
    text = FRONTEND.read_text().replace('.startswith("AWS")', '.startswith(&#10;"AWS")')
    (tmp_path / "frontend.xml").write_text(text)
    out = tmp_path / "glidein.yaml"
    assert cli.main(["import-gwms", "--frontend", str(tmp_path / "frontend.xml"), "--factory", str(FACTORY),
                     "-o", str(out)]) == 0
    assert load_config(out).frontend("vo-frontend-mcore").match_expr == "job.RequestCpus >= 4"
    assert 'startswith( "AWS")' in out.read_text()
