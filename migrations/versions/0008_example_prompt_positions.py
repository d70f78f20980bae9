"""Examples: the focus token's position in their source prompt

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 06:00:00

``collect`` stores the sequences examples come from as prompts (``examples.prompt_id``) and the focus token's
place in it here, so the feature page links an example to its trace without reading the trace's token ids.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("examples", sa.Column("prompt_pos", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("examples") as batch:
        batch.drop_column("prompt_pos")
