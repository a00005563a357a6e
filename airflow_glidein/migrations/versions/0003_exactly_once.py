"""Exactly once and never lost: launch calls, a run's failures, entries' last settings, backoff per run.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04

- ``glidein_launch_calls``: each launch's last create call (what it asked, when,
  how it ended), so a call whose answer never came is not repeated while the
  listing may still lag behind it, and its instances count as capacity.
- ``glidein_failures``: what failed at which entry in which factory run; the
  run's ``check_cycle`` turns it red.
- ``glidein_entry_snapshots``: each entry's settings as last configured, so the
  pilots of an entry taken out of the configuration are still listed and drained.
- ``glidein_entry_health.run_id``: the run that last counted a failure, so
  Airflow's retries of one failed launch back the entry off once.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "glidein_launch_calls",
        sa.Column("entry", sa.String(64), primary_key=True),
        sa.Column("launch_id", sa.String(255), primary_key=True),
        sa.Column("frontend", sa.String(64)),
        sa.Column("burst", sa.String(128)),
        sa.Column("expected", sa.Integer, nullable=False),
        sa.Column("started", sa.Float, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
    )
    op.create_table(
        "glidein_failures",
        sa.Column("run_id", sa.String(256), primary_key=True),
        sa.Column("entry", sa.String(64), primary_key=True),
        sa.Column("call", sa.String(64), primary_key=True),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("at", sa.Float, nullable=False),
    )
    op.create_table(
        "glidein_entry_snapshots",
        sa.Column("entry", sa.String(64), primary_key=True),
        sa.Column("config", sa.Text, nullable=False),
        sa.Column("updated", sa.Float, nullable=False),
    )
    with op.batch_alter_table("glidein_entry_health") as batch:
        batch.add_column(sa.Column("run_id", sa.String(256)))


def downgrade() -> None:
    with op.batch_alter_table("glidein_entry_health") as batch:
        batch.drop_column("run_id")
    for table in ("glidein_entry_snapshots", "glidein_failures", "glidein_launch_calls"):
        op.drop_table(table)
