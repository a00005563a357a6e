"""Alembic environment of the glidein state store.

``state.StateStore`` runs it with its own connection, inside a transaction
that holds the migration lock; the ``alembic`` command (developers drafting
a revision) gets an engine for the configured store instead.
"""

from __future__ import annotations

from alembic import context

from airflow_glidein import state


def _run(conn) -> None:
    target = None
    if context.config.cmd_opts is not None and getattr(context.config.cmd_opts, "autogenerate", False):
        from airflow_glidein.migrations import declared_metadata

        target = declared_metadata()
    context.configure(connection=conn, version_table=state.VERSION_TABLE, target_metadata=target,
                      render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


conn = context.config.attributes.get("connection")
if conn is not None:
    _run(conn)
else:
    engine = state.engine(state.default_url())
    with engine.connect() as conn:
        _run(conn)
        conn.commit()
    engine.dispose()
