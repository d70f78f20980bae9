"""Workers: what each claims, and what its supervisor (`adapterlens up`) saw (restarts, stopped, note)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("kinds", sa.String(length=300), nullable=True))
        batch.add_column(sa.Column("restarts", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("stopped", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("note", sa.String(length=500), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("note")
        batch.drop_column("stopped")
        batch.drop_column("restarts")
        batch.drop_column("kinds")
