"""The state store as it was before migrations (tables made by METADATA.create_all).

Revision ID: 0001
Revises:
Create Date: 2026-12-04

Creates only the tables a database lacks: a store made by the old
``create_all`` (which made each table when its module was first used) is
adopted with its rows, and gets whatever tables it never needed.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_TABLES = ("glidein_api_tokens", "glidein_credential_rotation", "glidein_demand_watch", "glidein_entry_health",
           "glidein_keys", "glidein_launches", "glidein_pilot_bindings", "glidein_pilots", "glidein_tokens")


def _create(name: str, *columns, indexes: tuple[tuple[str, list[str]], ...] = ()) -> None:
    if sa.inspect(op.get_bind()).has_table(name):
        return
    op.create_table(name, *columns)
    for index, cols in indexes:
        op.create_index(index, name, cols)


def upgrade() -> None:
    _create("glidein_api_tokens",
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("endpoint", sa.String(255), nullable=False),
            sa.Column("at", sa.Float, nullable=False),
            indexes=(("ix_glidein_api_tokens_endpoint_at", ["endpoint", "at"]),))
    _create("glidein_credential_rotation",
            sa.Column("frontend", sa.String(64), primary_key=True),
            sa.Column("entry", sa.String(64), primary_key=True),
            sa.Column("purpose", sa.String(16), primary_key=True),
            sa.Column("credential", sa.String(64), nullable=False),
            sa.Column("cycle", sa.String(250), nullable=False))
    _create("glidein_demand_watch",
            sa.Column("frontend", sa.String(64), primary_key=True),
            sa.Column("fired", sa.Float, nullable=False),
            sa.Column("idle", sa.Integer, nullable=False))
    _create("glidein_entry_health",
            sa.Column("entry", sa.String(64), primary_key=True),
            sa.Column("failures", sa.Integer, nullable=False),
            sa.Column("until", sa.Float, nullable=False),
            sa.Column("reason", sa.Text),
            sa.Column("updated", sa.Float, nullable=False))
    _create("glidein_keys",
            sa.Column("name", sa.String(64), primary_key=True),
            sa.Column("secret", sa.Text, nullable=False),
            sa.Column("created", sa.Float, nullable=False))
    _create("glidein_launches",
            sa.Column("launch_id", sa.String(255), primary_key=True),
            sa.Column("factory", sa.String(64), nullable=False),
            sa.Column("entry", sa.String(64), nullable=False),
            sa.Column("frontend", sa.String(64), nullable=False),
            sa.Column("count", sa.Integer, nullable=False),
            sa.Column("provision_conn", sa.String(255), nullable=False),
            sa.Column("pilot_credential", sa.String(64)),
            sa.Column("start_expr", sa.Text, nullable=False),
            sa.Column("policy", sa.Text, nullable=False),
            sa.Column("created", sa.Float, nullable=False))
    _create("glidein_pilot_bindings",
            sa.Column("entry", sa.String(64), primary_key=True),
            sa.Column("pilot_id", sa.String(255), primary_key=True),
            sa.Column("launch_id", sa.String(255), nullable=False),
            sa.Column("bound", sa.Float, nullable=False),
            indexes=(("ix_glidein_pilot_bindings_launch_id", ["launch_id"]),))
    _create("glidein_pilots",
            sa.Column("id", sa.String(128), primary_key=True),
            sa.Column("entry", sa.String(64), nullable=False),
            sa.Column("frontend", sa.String(64)),
            sa.Column("burst", sa.String(128)),
            sa.Column("launch", sa.String(256)),
            sa.Column("request", sa.String(256)),
            sa.Column("factory_run", sa.String(256)),
            sa.Column("launched", sa.Float, nullable=False),
            sa.Column("state", sa.String(32), nullable=False),
            sa.Column("provider_state", sa.String(32)),
            sa.Column("conn", sa.String(256)),
            sa.Column("detail", sa.Text),
            sa.Column("startd", sa.Text),
            sa.Column("policy", sa.Text),
            sa.Column("memory", sa.Text, nullable=False),
            sa.Column("updated", sa.Float, nullable=False),
            indexes=(("ix_glidein_pilots_entry", ["entry"]),))
    _create("glidein_tokens",
            sa.Column("token_hash", sa.String(64), primary_key=True),
            sa.Column("kind", sa.String(16), nullable=False),
            sa.Column("launch_id", sa.String(255), nullable=False),
            sa.Column("pilot_id", sa.String(255)),
            sa.Column("expires", sa.Float, nullable=False),
            indexes=(("ix_glidein_tokens_launch_id", ["launch_id"]),))


def downgrade() -> None:
    for name in reversed(_TABLES):
        op.drop_table(name)
