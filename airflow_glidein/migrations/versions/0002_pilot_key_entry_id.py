"""A pilot is (entry, provider id): the pilot table's primary key becomes (entry, id).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04

Provider ids collide across endpoints (two OpenNebula servers both number
their VMs from 0), so the bare id cannot key the table. Rows keep their
values: the old key was unique, so the new one is.
"""

from __future__ import annotations

import warnings

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

PK = "glidein_pilots_pkey"  # PostgreSQL's name for the key create_table made; SQLite's is unnamed


def _key(columns: list[str]) -> None:
    if op.get_bind().dialect.name == "sqlite":  # no ALTER of a key: the table is copied
        with warnings.catch_warnings():  # SQLAlchemy notes that the copied id column loses its old key flag
            warnings.filterwarnings("ignore", "Table '_alembic_tmp_glidein_pilots' specifies columns")
            with op.batch_alter_table("glidein_pilots", recreate="always") as batch:
                batch.create_primary_key(PK, columns)
    else:
        op.drop_constraint(PK, "glidein_pilots", type_="primary")
        op.create_primary_key(PK, "glidein_pilots", columns)


def upgrade() -> None:
    _key(["entry", "id"])


def downgrade() -> None:
    _key(["id"])  # fails, changing nothing, if two entries hold the same id
