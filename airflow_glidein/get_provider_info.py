"""Provider metadata for Airflow's providers manager (entry point apache_airflow_provider)."""

from __future__ import annotations

from airflow_glidein import __version__


def get_provider_info() -> dict:
    return {
        "package-name": "airflow-glidein",
        "name": "Glidein (HTCondor pilots on clouds and grids)",
        "description": "Pilot-based cloud bursting for HTCondor pools: frontends, a factory, and middleware hooks.",
        "versions": [__version__],
        "integrations": [
            {"integration-name": "HTCondor glideins", "external-doc-url": "https://glideinwms.fnal.gov/",
             "tags": ["software"]},
        ],
        "operators": [
            {"integration-name": "HTCondor glideins",
             "python-modules": ["airflow_glidein.operators.frontend", "airflow_glidein.operators.factory"]},
        ],
        "hooks": [
            {"integration-name": "HTCondor glideins",
             "python-modules": ["airflow_glidein.hooks.ec2", "airflow_glidein.hooks.htcondor",
                                "airflow_glidein.hooks.openstack", "airflow_glidein.hooks.opennebula",
                                "airflow_glidein.hooks.htcondor_g"]},
        ],
        "connection-types": [
            {
                "connection-type": "htcondor",
                "hook-class-name": "airflow_glidein.hooks.htcondor.HTCondorHook",
                "hook-name": "HTCondor pool",
                "conn-fields": {
                    "collector": {"label": "Collector (host[:port])", "schema": {"type": ["string", "null"]}},
                },
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "login", "port", "extra"],
                    "relabeling": {"host": "Collector host", "password": "Pool token (IDTOKEN)"},
                    "placeholders": {"host": "cm.example.org:9618"},
                },
            },
            {
                "connection-type": "openstack",
                "hook-class-name": "airflow_glidein.hooks.openstack.OpenStackPilotHook",
                "hook-name": "Glidein pilots on OpenStack",
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "port"],
                    "relabeling": {"host": "Auth URL (Keystone v3)", "login": "User or application credential id",
                                   "password": "Password or application credential secret"},
                    "placeholders": {"host": "https://keystone.example.org:5000/v3",
                                     "extra": '{"auth_type": "v3applicationcredential", "region_name": "RegionOne"}'},
                },
            },
            {
                "connection-type": "opennebula",
                "hook-class-name": "airflow_glidein.hooks.opennebula.OpenNebulaPilotHook",
                "hook-name": "Glidein pilots on OpenNebula",
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "port"],
                    "relabeling": {"host": "XML-RPC endpoint", "login": "OpenNebula user", "password": "Password"},
                    "placeholders": {"host": "https://one.example.org:2633/RPC2", "extra": '{"verify": true}'},
                },
            },
        ],
    }
