"""Token search and graph membership tables: feature_tokens (promotes / fires on), graph_features;
feature_sets.summary (the study behind a set)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06 05:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")


def upgrade() -> None:
    op.create_table(
        "feature_tokens",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("relation", sa.String(length=16), nullable=False),
        sa.Column("token_id", sa.Integer(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_feature_tokens_run_id_runs"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("run_id", "relation", "token_id", "layer", "index", name=op.f("pk_feature_tokens")),
    )
    op.create_table(
        "graph_features",
        sa.Column("graph_id", sa.Integer(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("positions", JSON, nullable=False),
        sa.Column("influence", sa.Float(), nullable=True),
        sa.Column("activation", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["graph_id"], ["graphs.id"], name=op.f("fk_graph_features_graph_id_graphs"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_graph_features_run_id_runs"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("graph_id", "layer", "index", name=op.f("pk_graph_features")),
    )
    op.create_index("ix_graph_features_feature", "graph_features", ["run_id", "layer", "index"], unique=False)
    op.add_column("feature_sets", sa.Column("summary", JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("feature_sets") as batch:
        batch.drop_column("summary")
    op.drop_index("ix_graph_features_feature", table_name="graph_features")
    op.drop_table("graph_features")
    op.drop_table("feature_tokens")
