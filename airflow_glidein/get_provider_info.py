"""Provider metadata for Airflow's providers manager (entry point apache_airflow_provider)."""

from __future__ import annotations

from airflow_glidein import __version__


_STD = ["description", "host", "port", "login", "password", "schema", "extra"]


def _hide(*shown: str) -> list[str]:
    return [f for f in _STD if f not in shown and f != "description"]


def _text(label: str, description: str, secret: bool = False, multiline: bool = False) -> dict:
    schema: dict = {"type": ["string", "null"]}
    if multiline:
        schema["format"] = "multiline"
    elif secret:
        schema["format"] = "password"
    return {"label": label, "description": description, "schema": schema}


# Credential kinds Airflow has no connection type for (EC2 keys use the Amazon
# provider's ``aws``). Secret extra fields have names Airflow hides (proxy,
# private_key, passphrase); see airflow_glidein/material.py for the layout.
CREDENTIAL_CONNECTION_TYPES = [
    {
        "connection-type": "glidein_x509",
        "hook-class-name": "airflow_glidein.secrets.X509ProxyHook",
        "hook-name": "Glidein x509 proxy",
        "conn-fields": {
            "proxy": _text("Proxy (PEM)", "Certificate, private key and chain, as in the proxy file",
                           secret=True, multiline=True),
            "expires_at": _text("Expires at", "Optional; the proxy's own not-after is read from it"),
        },
        "ui-field-behaviour": {"hidden-fields": _hide("extra")},
    },
    {
        "connection-type": "glidein_token",
        "hook-class-name": "airflow_glidein.secrets.TokenHook",
        "hook-name": "Glidein bearer token (IDTOKEN, SciToken)",
        "conn-fields": {},
        "ui-field-behaviour": {
            "hidden-fields": _hide("password"),
            "relabeling": {"password": "Token (JWT)"},
        },
    },
    {
        "connection-type": "glidein_ssh",
        "hook-class-name": "airflow_glidein.secrets.SSHKeyHook",
        "hook-name": "Glidein SSH key pair",
        "conn-fields": {
            "private_key": _text("Private key", "OpenSSH or PEM private key", secret=True, multiline=True),
            "passphrase": _text("Passphrase", "If the private key is encrypted", secret=True),
        },
        "ui-field-behaviour": {
            "hidden-fields": _hide("login", "extra"),
            "relabeling": {"login": "Key pair name at the provider"},
        },
    },
    {
        "connection-type": "glidein_openstack",
        "hook-class-name": "airflow_glidein.secrets.OpenStackCredentialHook",
        "hook-name": "Glidein OpenStack credential",
        "conn-fields": {
            "auth_type": {"label": "Auth type", "schema": {"type": ["string", "null"],
                          "enum": ["application_credential", "password"], "default": "application_credential"}},
            "project_name": _text("Project name", "Password auth: the project to scope to"),
            "project_id": _text("Project id", "Password auth: instead of the project name"),
            "user_domain_name": _text("User domain", "Password auth (default: Default)"),
            "project_domain_name": _text("Project domain", "Password auth (default: Default)"),
            "region_name": _text("Region", "Optional"),
            "expires_at": _text("Expires at", "Optional: the application credential's expiry (ISO 8601)"),
        },
        "ui-field-behaviour": {
            "hidden-fields": _hide("host", "login", "password", "extra"),
            "relabeling": {"host": "Auth URL (Keystone)", "login": "Application credential id or user name",
                           "password": "Secret or password"},
            "placeholders": {"host": "https://keystone.example.org:5000/v3"},
        },
    },
    {
        "connection-type": "glidein_opennebula",
        "hook-class-name": "airflow_glidein.secrets.OpenNebulaCredentialHook",
        "hook-name": "Glidein OpenNebula user",
        "conn-fields": {},
        "ui-field-behaviour": {
            "hidden-fields": _hide("host", "login", "password"),
            "relabeling": {"host": "XML-RPC endpoint", "login": "User", "password": "Password or token"},
            "placeholders": {"host": "https://one.example.org:2633/RPC2"},
        },
    },
]


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
             "python-modules": ["airflow_glidein.hooks.ec2", "airflow_glidein.hooks.htcondor", "airflow_glidein.secrets",
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
            *CREDENTIAL_CONNECTION_TYPES,
        ],
    }
