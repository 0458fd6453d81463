"""authstate: the API-key generation counter (one row) that lets API processes cache key lookups

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 02:00:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import sqlmodel


revision: str = '0004'
down_revision: Union[str, Sequence[str], None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('authstate',
    sa.Column('scope', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('generation', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('scope')
    )
    op.execute("INSERT INTO authstate (scope, generation) VALUES ('api_keys', 0)")


def downgrade() -> None:
    op.drop_table('authstate')
