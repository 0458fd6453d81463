"""job status: drop `crashed` (a crashed attempt is recorded on the Attempt row; the job goes back
to `queued` with backoff, or to `failed`, in the same transaction — no job was ever left in it).

Postgres keeps enum labels until the type is recreated: the column moves to a new `jobstatus`
type without the label. SQLite stores the status as text (no constraint to change).

Revision ID: 0002
Revises: 0001
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: Union[str, Sequence[str], None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

WITHOUT = ("waiting", "queued", "running", "cancelling", "succeeded", "failed", "cancelled")
WITH = ("waiting", "queued", "running", "cancelling", "crashed", "succeeded", "failed", "cancelled")


def _retype(labels: tuple[str, ...]) -> None:
    op.execute("ALTER TYPE jobstatus RENAME TO jobstatus_old")
    sa.Enum(*labels, name="jobstatus").create(op.get_bind())
    op.execute("ALTER TABLE job ALTER COLUMN status TYPE jobstatus USING status::text::jobstatus")
    op.execute("DROP TYPE jobstatus_old")


def upgrade() -> None:
    # never written by any released version; resolved as the sweeper did (retry) just in case
    op.execute("UPDATE job SET status = 'queued' WHERE status = 'crashed'")
    if op.get_bind().dialect.name == "postgresql":
        _retype(WITHOUT)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _retype(WITH)
