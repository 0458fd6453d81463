"""online loop: prompt sets, artefact provenance and upload findings on feedback files, the run's
head (+ its history) and round gates, labelling-tool integrations (webhook drafts, delivery ids).

Generated with `alembic revision --autogenerate`, then reviewed: the feedbackfile.job_id foreign
key is named (SQLite batch mode needs the name to drop it); `source` gets 'upload' for the rows
that exist (every earlier feedback file was uploaded) and keeps no server default after.

Revision ID: 0003
Revises: 0002
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import sqlmodel


# revision identifiers, used by Alembic.
revision: str = '0003'
down_revision: Union[str, Sequence[str], None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('integration',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('project_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('tool', sqlmodel.sql.sqltypes.AutoString(length=20), nullable=False),
    sa.Column('label_config', sqlmodel.sql.sqltypes.AutoString(length=20), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True),
    sa.Column('secret', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['project.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('integration', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_integration_project_id'), ['project_id'], unique=False)

    op.create_table('promptset',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('project_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('format', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('sha256', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('size_bytes', sa.Integer(), nullable=False),
    sa.Column('n_prompts', sa.Integer(), nullable=False),
    sa.Column('n_train', sa.Integer(), nullable=False),
    sa.Column('n_test', sa.Integer(), nullable=False),
    sa.Column('storage_path', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('original_filename', sqlmodel.sql.sqltypes.AutoString(length=1024), nullable=True),
    sa.Column('findings', sa.JSON(), nullable=True),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['project.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('promptset', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_promptset_project_id'), ['project_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_promptset_sha256'), ['sha256'], unique=False)

    op.create_table('draftannotation',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('integration_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('external_id', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
    sa.Column('version', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('deleted', sa.Boolean(), nullable=False),
    sa.Column('record', sa.JSON(), nullable=True),
    sa.Column('sealed_into', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('updated_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['integration_id'], ['integration.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('integration_id', 'external_id', name='uq_draft_annotation')
    )
    with op.batch_alter_table('draftannotation', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_draftannotation_integration_id'), ['integration_id'], unique=False)

    op.create_table('webhookdelivery',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('integration_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('delivery_id', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['integration_id'], ['integration.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('integration_id', 'delivery_id', name='uq_webhook_delivery')
    )
    with op.batch_alter_table('webhookdelivery', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_webhookdelivery_integration_id'), ['integration_id'], unique=False)

    op.create_table('headmove',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('run_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('from_checkpoint_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('to_checkpoint_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('reason', sqlmodel.sql.sqltypes.AutoString(length=20), nullable=False),
    sa.Column('round_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['run.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('headmove', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_headmove_run_id'), ['run_id'], unique=False)

    with op.batch_alter_table('feedbackfile', schema=None) as batch_op:
        batch_op.add_column(sa.Column('source', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False,
                                      server_default='upload'))
        batch_op.add_column(sa.Column('job_id', sqlmodel.sql.sqltypes.AutoString(), nullable=True))
        batch_op.add_column(sa.Column('provenance', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('findings', sa.JSON(), nullable=True))
        batch_op.create_index(batch_op.f('ix_feedbackfile_job_id'), ['job_id'], unique=False)
        batch_op.create_foreign_key('fk_feedbackfile_job_id_job', 'job', ['job_id'], ['id'])
    with op.batch_alter_table('feedbackfile', schema=None) as batch_op:
        batch_op.alter_column('source', server_default=None)

    with op.batch_alter_table('round', schema=None) as batch_op:
        batch_op.add_column(sa.Column('gate', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('promoted', sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column('promotion', sa.JSON(), nullable=True))

    with op.batch_alter_table('run', schema=None) as batch_op:
        batch_op.add_column(sa.Column('head_checkpoint_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('run', schema=None) as batch_op:
        batch_op.drop_column('head_checkpoint_id')

    with op.batch_alter_table('round', schema=None) as batch_op:
        batch_op.drop_column('promotion')
        batch_op.drop_column('promoted')
        batch_op.drop_column('gate')

    with op.batch_alter_table('feedbackfile', schema=None) as batch_op:
        batch_op.drop_constraint('fk_feedbackfile_job_id_job', type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_feedbackfile_job_id'))
        batch_op.drop_column('findings')
        batch_op.drop_column('provenance')
        batch_op.drop_column('job_id')
        batch_op.drop_column('source')

    with op.batch_alter_table('headmove', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_headmove_run_id'))

    op.drop_table('headmove')
    with op.batch_alter_table('webhookdelivery', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_webhookdelivery_integration_id'))

    op.drop_table('webhookdelivery')
    with op.batch_alter_table('draftannotation', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_draftannotation_integration_id'))

    op.drop_table('draftannotation')
    with op.batch_alter_table('promptset', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_promptset_sha256'))
        batch_op.drop_index(batch_op.f('ix_promptset_project_id'))

    op.drop_table('promptset')
    with op.batch_alter_table('integration', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_integration_project_id'))

    op.drop_table('integration')
