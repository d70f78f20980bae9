"""Feature labels (built-in rules or an LLM judge) with their category, and full-text search of them

Revision ID: 0007
Revises: 0005
Create Date: 2026-12-06 12:00:00

The search index lives outside the models (app/db/schema.py ``FeatureLabel``): SQLite an FTS5 table with
external content (the labels' own rows) kept in step by triggers; Postgres a GIN index on
``to_tsvector('simple', label)`` (no stemming, as SQLite's unicode61 tokenizer).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")

SQLITE_FTS = [
    "CREATE VIRTUAL TABLE feature_labels_fts USING fts5(label, content='feature_labels', content_rowid='id', "
    "tokenize='unicode61')",
    "CREATE TRIGGER feature_labels_fts_ai AFTER INSERT ON feature_labels BEGIN "
    "INSERT INTO feature_labels_fts(rowid, label) VALUES (new.id, new.label); END",
    "CREATE TRIGGER feature_labels_fts_ad AFTER DELETE ON feature_labels BEGIN "
    "INSERT INTO feature_labels_fts(feature_labels_fts, rowid, label) VALUES ('delete', old.id, old.label); END",
    "CREATE TRIGGER feature_labels_fts_au AFTER UPDATE ON feature_labels BEGIN "
    "INSERT INTO feature_labels_fts(feature_labels_fts, rowid, label) VALUES ('delete', old.id, old.label); "
    "INSERT INTO feature_labels_fts(rowid, label) VALUES (new.id, new.label); END",
]
PG_FTS = "CREATE INDEX ix_feature_labels_fts ON feature_labels USING gin (to_tsvector('simple', label))"


def upgrade() -> None:
    op.create_table(
        "feature_labels",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(length=200), nullable=False),
        sa.Column("label", sa.String(length=500), nullable=False),
        sa.Column("category", sa.String(length=100), nullable=True),
        sa.Column("subcategory", sa.String(length=100), nullable=True),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("details", JSON, nullable=True),
        sa.Column("created", sa.DateTime(timezone=True), server_default=sa.text("CURRENT_TIMESTAMP"), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_feature_labels_run_id_runs"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_feature_labels")),
    )
    op.create_index("ix_feature_labels_feature", "feature_labels", ["run_id", "layer", "index", "source"],
                    unique=True)
    op.create_index("ix_feature_labels_run_source", "feature_labels",
                    ["run_id", "source", "layer", "category", "subcategory"], unique=False)
    if op.get_bind().dialect.name == "sqlite":
        for statement in SQLITE_FTS:
            op.execute(statement)
    elif op.get_bind().dialect.name == "postgresql":
        op.execute(PG_FTS)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for name in ("feature_labels_fts_au", "feature_labels_fts_ad", "feature_labels_fts_ai"):
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
        op.execute("DROP TABLE IF EXISTS feature_labels_fts")
    elif op.get_bind().dialect.name == "postgresql":
        op.execute("DROP INDEX IF EXISTS ix_feature_labels_fts")
    op.drop_index("ix_feature_labels_run_source", table_name="feature_labels")
    op.drop_index("ix_feature_labels_feature", table_name="feature_labels")
    op.drop_table("feature_labels")
