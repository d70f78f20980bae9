"""The diff lens: lens_results (one text through target, hybrid and adapted; cached by run and token ids);
features.hesitation_lens (how directly a feature promotes the hesitation tokens) with its sort index

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 08:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")


def upgrade() -> None:
    op.create_table(
        "lens_results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=32), server_default="todo", nullable=False),
        sa.Column("request", JSON, nullable=False),
        sa.Column("request_key", sa.String(length=64), nullable=False),
        sa.Column("token_key", sa.String(length=64), nullable=True),
        sa.Column("n_tokens", sa.Integer(), nullable=True),
        sa.Column("result", JSON, nullable=True),
        sa.Column("summary", JSON, nullable=True),
        sa.Column("created", sa.DateTime(timezone=True), server_default=sa.text("CURRENT_TIMESTAMP"), nullable=False),
        sa.Column("finished", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_lens_results_job_id_jobs"), ondelete="SET NULL"),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_lens_results_run_id_runs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lens_results")),
    )
    op.create_index("ix_lens_results_run_request", "lens_results", ["run_id", "request_key"], unique=False)
    op.create_index("ix_lens_results_run_tokens", "lens_results", ["run_id", "token_key"], unique=False)
    with op.batch_alter_table("features") as batch:
        batch.add_column(sa.Column("hesitation_lens", sa.Float(), nullable=True))
    op.create_index("ix_features_run_hesitation_lens", "features", ["run_id", "hesitation_lens", "layer", "index"],
                    unique=False)


def downgrade() -> None:
    op.drop_index("ix_features_run_hesitation_lens", table_name="features")
    with op.batch_alter_table("features") as batch:
        batch.drop_column("hesitation_lens")
    op.drop_index("ix_lens_results_run_tokens", table_name="lens_results")
    op.drop_index("ix_lens_results_run_request", table_name="lens_results")
    op.drop_table("lens_results")
