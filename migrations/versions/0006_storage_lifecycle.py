"""storage lifecycle: checkpoint `state` (whole | optimizer_pruned | pruned), `pinned`, `pruned_at`;
tombstones (`deleted_at`) on feedback files, prompt sets, runs and models; per-run `retention`
overrides; table `deletionintent` (bytes the rows no longer point at, removed by
server/storage_lifecycle and finished by the sweeper after a kill).

Written by hand. Existing checkpoints are `whole` and not pinned: the new NOT NULL columns are added
with a server default that fills the existing rows, then the default is dropped (the models have
none; tests/server/test_migrations.py compares server defaults).

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TOMBSTONED = ("feedbackfile", "promptset", "run", "model")


def upgrade() -> None:
    op.create_table(
        "deletionintent",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column("kind", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("subject_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("actions", sa.JSON(), nullable=True),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("finished_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("deletionintent", schema=None) as batch_op:
        batch_op.create_index("ix_deletionintent_open", ["finished_at", "id"], unique=False)

    with op.batch_alter_table("checkpoint", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("state", sqlmodel.sql.sqltypes.AutoString(length=20), nullable=False, server_default="whole")
        )
        batch_op.add_column(sa.Column("pinned", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column("pruned_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
    with op.batch_alter_table("checkpoint", schema=None) as batch_op:
        batch_op.alter_column("state", server_default=None)
        batch_op.alter_column("pinned", server_default=None)

    for table in _TOMBSTONED:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("deleted_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
    with op.batch_alter_table("run", schema=None) as batch_op:
        batch_op.add_column(sa.Column("retention", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("run", schema=None) as batch_op:
        batch_op.drop_column("retention")
    for table in reversed(_TOMBSTONED):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("deleted_at")
    with op.batch_alter_table("checkpoint", schema=None) as batch_op:
        batch_op.drop_column("pruned_at")
        batch_op.drop_column("pinned")
        batch_op.drop_column("state")
    with op.batch_alter_table("deletionintent", schema=None) as batch_op:
        batch_op.drop_index("ix_deletionintent_open")
    op.drop_table("deletionintent")
