"""Versioned schema of the glidein state store (Alembic, as Airflow's own metadata DB).

``state.store()`` brings a database to the newest revision on its first use
in a process (one process at a time: a PostgreSQL advisory lock, SQLite's
write lock); ``python -m airflow_glidein migrate-state`` does the same by
hand. The revision is kept in ``glidein_alembic_version`` (not Alembic's
default ``alembic_version``, which Airflow's own metadata DB uses: the state
store may live in the same PostgreSQL database). A store made before
migrations existed (tables, no version table) is adopted as 0001: 0001
creates only the tables it lacks, rows stay, and later revisions apply.

The code's queries use the ``Table`` objects declared on ``state.METADATA``
in each feature module; the schema comes only from the revisions here.
``tests/test_state_store.py`` compares the migrated schema with METADATA on
SQLite and PostgreSQL, so a table or column declared without its revision
fails that test, named.

Adding a table or a column (a later change):

1. Declare it on ``state.METADATA`` in the feature module, as today.
2. Add ``versions/NNNN_what.py`` with the next number as ``revision`` and the
   current head as ``down_revision`` (``alembic -c
   airflow_glidein/migrations/alembic.ini revision --rev-id NNNN -m "what"``
   writes the skeleton; ``--autogenerate`` with ``GLIDEIN_STATE_URL`` set to a
   migrated scratch database drafts the operations, to be read and kept
   explicit). Write explicit ``op.create_table`` / ``op.add_column`` calls,
   never ``METADATA.create_all``: a revision is frozen, the module's
   declaration moves on. SQLite cannot alter constraints in place: use
   ``op.batch_alter_table`` there. Write ``downgrade`` too.
3. Run ``tests/test_state_store.py``: schema comparison (SQLite, PostgreSQL)
   and the upgrade of an old store with rows.

Never edit a released revision: databases out there have run it.
"""

from __future__ import annotations

import importlib
import pkgutil

from sqlalchemy import MetaData


def declared_metadata() -> MetaData:
    """``state.METADATA`` with every table the code declares (imports each module of the package)."""
    import airflow_glidein
    import airflow_glidein.operators
    import airflow_glidein.sensors
    from airflow_glidein.state import METADATA

    for pkg in (airflow_glidein, airflow_glidein.operators, airflow_glidein.sensors):
        for mod in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if not mod.name.endswith(("__main__", ".migrations.env")) and ".migrations.versions" not in mod.name:
                importlib.import_module(mod.name)
    return METADATA
