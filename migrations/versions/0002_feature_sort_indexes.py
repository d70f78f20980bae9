"""Feature sort indexes end in (layer, index): keyset pages of the feature index are one range scan

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 13:50:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_features_run_max_act", table_name="features")
    op.drop_index("ix_features_run_layer_freq", table_name="features")
    op.create_index("ix_features_run_max_act", "features", ["run_id", "max_act", "layer", "index"], unique=False)
    op.create_index("ix_features_run_layer_freq", "features", ["run_id", "layer", "frequency", "index"], unique=False)
    op.create_index("ix_features_run_frequency", "features", ["run_id", "frequency", "layer", "index"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_features_run_frequency", table_name="features")
    op.drop_index("ix_features_run_layer_freq", table_name="features")
    op.drop_index("ix_features_run_max_act", table_name="features")
    op.create_index("ix_features_run_layer_freq", "features", ["run_id", "layer", "frequency"], unique=False)
    op.create_index("ix_features_run_max_act", "features", ["run_id", "max_act"], unique=False)
