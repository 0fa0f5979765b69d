"""Bearer tokens for NGINX's auth_request (`runyard tokens`).

Frozen once released, like every revision.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

MYSQL = {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin", "mariadb_charset": "utf8mb4",
         "mariadb_collate": "utf8mb4_bin"}


def upgrade() -> None:
    op.create_table(
        "access_tokens",
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("user_name", sa.String(255), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created_time", sa.BigInteger, nullable=False),
        sa.Column("expires_time", sa.BigInteger, nullable=True),
        sa.Column("last_used_time", sa.BigInteger, nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_access_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_access_tokens_token_hash")),
        **MYSQL,
    )


def downgrade() -> None:
    op.drop_table("access_tokens")
