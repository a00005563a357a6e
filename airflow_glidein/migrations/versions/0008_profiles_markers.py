"""Launch markers: the key pair each launch gets on an EC2-compatible cloud whose tags cannot be trusted.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04

- ``glidein_markers``: (entry, name) of a marker made at the provider (kind
  ``key_pair``), the launch it marks and the tags its instances would carry
  (JSON). Written before the marker and before RunInstances, so a listing maps
  instances back to their launch after any crash; deleted with the marker once
  its instances are gone.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "glidein_markers",
        sa.Column("entry", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("launch_id", sa.String(255), nullable=False),
        sa.Column("tags", sa.Text, nullable=False),
        sa.Column("created", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("glidein_markers")
