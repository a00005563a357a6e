"""The bootstrap service under load: launch listings shared by replicas, a per-pilot log quota.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04

- ``glidein_launch_listings``: what the provider last listed under a launch
  (or that the listing failed), shared by every service process, so a launch
  is listed at most once per interval whatever is asked, misses included.
- ``glidein_pilot_log_files``: each pilot's stored log files and the room of
  uploads in flight, reserved atomically before streaming, so parallel uploads
  cannot together pass the per-pilot cap or the cap on files.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "glidein_launch_listings",
        sa.Column("launch_id", sa.String(255), primary_key=True),
        sa.Column("ids", sa.Text),
        sa.Column("listed", sa.Float, nullable=False),
        sa.Column("next", sa.Float, nullable=False),
        sa.Column("claimed", sa.Float),
        sa.Column("reason", sa.Text),
    )
    op.create_table(
        "glidein_pilot_log_files",
        sa.Column("entry", sa.String(64), primary_key=True),
        sa.Column("pilot_id", sa.String(255), primary_key=True),
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("upload", sa.String(64), primary_key=True),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("updated", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("glidein_pilot_log_files")
    op.drop_table("glidein_launch_listings")
