"""Alembic environment for the queue's schema.

`Queue.migrate()` runs the upgrade on its own connection (already inside a
``BEGIN IMMEDIATE`` transaction on SQLite, or holding an advisory lock on PostgreSQL,
so concurrent migrations serialise) and passes it in
``config.attributes["connection"]``; there is no alembic.ini. The migrations are
written once for both databases. For
`alembic revision --autogenerate` by hand, set ``sqlalchemy.url`` instead.
"""

from alembic import context
from sqlalchemy import create_engine

from dicom_node.queue.models import metadata


def _run(connection) -> None:
    # render_as_batch: SQLite cannot ALTER most things; later migrations copy tables.
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    engine = create_engine(context.config.get_main_option("sqlalchemy.url"))
    with engine.begin() as connection:
        _run(connection)
