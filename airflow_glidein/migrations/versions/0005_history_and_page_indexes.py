"""The Pilots page over time and at scale: history samples, and indexes its pilot-table filters page on.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04

- ``glidein_history``: pilots per entry and state, idle jobs and requested
  levels per frontend and entry, sampled once per factory cycle and frontend
  run, rolled up hourly past two days and pruned past ``[glidein] history_days``.
- Two indexes on ``glidein_pilots`` (state, entry, id) and (frontend, entry, id):
  each filter of the page is then a range scan that ends in the table's key, so
  a page costs the same at any depth.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "glidein_history",
        sa.Column("t", sa.Float, nullable=False),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("entry", sa.String(64), nullable=False),
        sa.Column("frontend", sa.String(160), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("value", sa.Float, nullable=False),
    )
    op.create_index("ix_glidein_history_series", "glidein_history",
                    ["kind", "entry", "frontend", "t", "state", "value"])
    op.create_index("ix_glidein_history_step_t", "glidein_history", ["step", "t"])
    op.create_index("ix_glidein_pilots_state_entry_id", "glidein_pilots", ["state", "entry", "id"])
    op.create_index("ix_glidein_pilots_frontend_entry_id", "glidein_pilots", ["frontend", "entry", "id"])


def downgrade() -> None:
    op.drop_index("ix_glidein_pilots_frontend_entry_id", "glidein_pilots")
    op.drop_index("ix_glidein_pilots_state_entry_id", "glidein_pilots")
    op.drop_table("glidein_history")
