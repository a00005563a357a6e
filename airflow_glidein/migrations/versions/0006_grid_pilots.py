"""Grid pilots: when the site started a pilot, and the other id it may claim.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05

- ``glidein_pilots.started``: when the site started the pilot (a grid job's
  JobCurrentStartDate); a grid job may wait queued for hours, and its boot
  timeout and lifetime run from its start, not from its submission. NULL: not
  started yet, or a VM (which starts when it is launched).
- ``glidein_pilots.alias``: another id the pilot may give itself (an EC2 GAHP
  job's instance id, from its GridJobId): the pilot stays keyed by (entry,
  cluster.proc); the bootstrap service's exchange and the collector join
  accept the alias. Indexed with the entry, as the service looks pilots up by it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("glidein_pilots") as batch:
        batch.add_column(sa.Column("started", sa.Float))
        batch.add_column(sa.Column("alias", sa.String(128)))
    op.create_index("ix_glidein_pilots_entry_alias", "glidein_pilots", ["entry", "alias"])


def downgrade() -> None:
    op.drop_index("ix_glidein_pilots_entry_alias", table_name="glidein_pilots")
    with op.batch_alter_table("glidein_pilots") as batch:
        batch.drop_column("alias")
        batch.drop_column("started")
