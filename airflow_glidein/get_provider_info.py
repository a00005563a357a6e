"""Provider metadata for Airflow's providers manager (entry point apache_airflow_provider)."""

from __future__ import annotations

from airflow_glidein import __version__, middlewares
from airflow_glidein.middlewares import form_hidden as _hide
from airflow_glidein.middlewares import form_text as _text


# Credential kinds every middleware may meet, which Airflow has no connection type for (EC2 keys use the
# Amazon provider's ``aws``); each middleware brings its own forms (airflow_glidein.middlewares). Secret extra
# fields have names Airflow hides (proxy, private_key, passphrase); see airflow_glidein/material.py for the layout.
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
]


def get_provider_info() -> dict:
    """Our provider metadata; the middlewares installed beside us add their hook modules and connection forms."""
    described = middlewares.all_middlewares()
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
             "python-modules": ["airflow_glidein.hooks.htcondor", "airflow_glidein.secrets",
                                *dict.fromkeys(m.hook.rpartition(".")[0] for m in described)]},
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
            *(dict(form) for m in described for form in m.connection_forms),
        ],
    }
