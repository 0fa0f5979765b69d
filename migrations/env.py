"""Alembic environment for runyard's schema.

Driven programmatically by `migrations.runner`: online runs receive an open SQLAlchemy connection in
`config.attributes["connection"]` (and an optional `on_revision` progress callback); offline (`--sql`)
runs receive `config.attributes["dialect_name"]` and write SQL.
"""

from __future__ import annotations

from alembic import context

from server.store.schema import metadata

config = context.config


def _configure_common() -> dict:
    return {
        "target_metadata": metadata,
        "compare_type": True,
    }


def run_offline() -> None:
    context.configure(
        dialect_name=config.attributes["dialect_name"],
        literal_binds=True,
        **_configure_common(),
    )
    with context.begin_transaction():
        context.run_migrations()


def _reporter(on_revision):
    """Adapts alembic's per-step hook to `on_revision(revision_id)` (progress bars)."""
    if on_revision is None:
        return None

    def on_version_apply(*, step, **_):
        on_revision(step.up_revision_id)

    return on_version_apply


def run_online() -> None:
    connection = config.attributes["connection"]
    context.configure(
        connection=connection,
        # SQLite cannot ALTER most things in place; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        on_version_apply=_reporter(config.attributes.get("on_revision")),
        **_configure_common(),
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
