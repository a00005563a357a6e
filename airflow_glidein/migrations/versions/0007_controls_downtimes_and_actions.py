"""Operator controls: downtimes and stops, and the operators' actions.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04

- ``glidein_downtimes``: a downtime (kind "downtime") or stop switch (kind
  "stop") on an entry, a frontend, both, or the whole factory ("" is every
  one), from ``start_time`` to ``end_time`` (NULL: until ended), with its
  reason, who set it and whether it drains the pilots it covers.
- ``glidein_operator_actions``: who did what, when and why (downtimes, stops,
  pilot retire / terminate requests); a pilot request stays pending (``done``
  NULL) until the factory's reap has taken every pilot it names.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "glidein_downtimes",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("entry", sa.String(64), nullable=False, server_default=""),
        sa.Column("frontend", sa.String(64), nullable=False, server_default=""),
        sa.Column("start_time", sa.Float, nullable=False),
        sa.Column("end_time", sa.Float),
        sa.Column("drain", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("who", sa.String(256), nullable=False),
        sa.Column("ended_by", sa.String(256)),
    )
    op.create_index("ix_glidein_downtimes_end_time", "glidein_downtimes", ["end_time"])
    op.create_table(
        "glidein_operator_actions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("who", sa.String(256), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("entry", sa.String(64), nullable=False, server_default=""),
        sa.Column("frontend", sa.String(64), nullable=False, server_default=""),
        sa.Column("pilots", sa.Text),
        sa.Column("reason", sa.Text, nullable=False, server_default=""),
        sa.Column("outcome", sa.Text, nullable=False, server_default=""),
        sa.Column("done", sa.Float),
    )
    op.create_index("ix_glidein_operator_actions_at", "glidein_operator_actions", ["at"])
    op.create_index("ix_glidein_operator_actions_done", "glidein_operator_actions", ["done"])


def downgrade() -> None:
    op.drop_table("glidein_operator_actions")
    op.drop_table("glidein_downtimes")
