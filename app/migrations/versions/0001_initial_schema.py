"""Initial schema: runs, models, mining generations, concepts and their mined detail,
labels and history, users, share links, jobs, CAM images.

Revision ID: 0001
Revises: 
Create Date: 2026-11-29 12:47:21.485120
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None

FK_RUN_ACTIVE_GENERATION = "fk_runs_active_generation_id_mining_generations"


def upgrade() -> None:
    op.create_table('runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('run_dir', sa.Text(), nullable=False),
    sa.Column('store_dir', sa.Text(), nullable=False),
    sa.Column('image_set', sa.String(length=200), nullable=False),
    sa.Column('n_images', sa.Integer(), nullable=False),
    sa.Column('n_tokens', sa.BigInteger(), nullable=False),
    sa.Column('n_concepts', sa.Integer(), nullable=False),
    sa.Column('k', sa.Integer(), nullable=False),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('metrics', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.Column('mined_at', sa.DateTime(), nullable=True),
    sa.Column('active_generation_id', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['active_generation_id'], ['mining_generations.id'], name=op.f('fk_runs_active_generation_id_mining_generations'), ondelete='SET NULL', use_alter=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_runs')),
    sa.UniqueConstraint('name', name=op.f('uq_runs_name'))
    )
    op.create_table('users',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('username', sa.String(length=64), nullable=False),
    sa.Column('password_hash', sa.String(length=255), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('is_active', sa.Boolean(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_users')),
    sa.UniqueConstraint('username', name=op.f('uq_users_username'))
    )
    op.create_table('concepts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('index', sa.Integer(), nullable=False),
    sa.Column('energy', sa.Float(), nullable=False),
    sa.Column('firing_entropy', sa.Float(), nullable=False),
    sa.Column('cofire', sa.Float(), nullable=False),
    sa.Column('fire_count', sa.BigInteger(), nullable=False),
    sa.Column('frequency', sa.Float(), nullable=False),
    sa.Column('dead', sa.Boolean(), nullable=False),
    sa.Column('label', sa.String(length=200), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_concepts_run_id_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_concepts')),
    sa.UniqueConstraint('run_id', 'index', name=op.f('uq_concepts_run_id'))
    )
    with op.batch_alter_table('concepts', schema=None) as batch_op:
        batch_op.create_index('ix_concepts_run_energy', ['run_id', 'energy'], unique=False)
        batch_op.create_index('ix_concepts_run_entropy', ['run_id', 'firing_entropy'], unique=False)

    op.create_table('jobs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=50), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('progress', sa.Float(), nullable=False),
    sa.Column('message', sa.Text(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('result', sa.JSON(), nullable=True),
    sa.Column('run_id', sa.Integer(), nullable=True),
    sa.Column('created_by', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=True),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['created_by'], ['users.id'], name=op.f('fk_jobs_created_by_users'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_jobs_run_id_runs'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_jobs'))
    )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_jobs_run_id'), ['run_id'], unique=False)
        batch_op.create_index('ix_jobs_status_created', ['status', 'created_at'], unique=False)

    op.create_table('mining_generations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('media_prefix', sa.Text(), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=False),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_mining_generations_run_id_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_mining_generations'))
    )
    with op.batch_alter_table('mining_generations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_mining_generations_run_id'), ['run_id'], unique=False)

    # runs <-> mining_generations point at each other. SQLite keeps the runs FK inline (it
    # resolves references lazily); backends with ALTER get it now that both tables exist.
    if op.get_bind().dialect.supports_alter:
        op.create_foreign_key(FK_RUN_ACTIVE_GENERATION, "runs", "mining_generations",
                              ["active_generation_id"], ["id"], ondelete="SET NULL")

    op.create_table('run_models',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('family', sa.String(length=100), nullable=False),
    sa.Column('dim', sa.Integer(), nullable=False),
    sa.Column('grid_h', sa.Integer(), nullable=False),
    sa.Column('grid_w', sa.Integer(), nullable=False),
    sa.Column('info', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_run_models_run_id_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_run_models')),
    sa.UniqueConstraint('run_id', 'name', name=op.f('uq_run_models_run_id'))
    )
    with op.batch_alter_table('run_models', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_run_models_run_id'), ['run_id'], unique=False)

    op.create_table('share_links',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('token_hash', sa.String(length=128), nullable=False),
    sa.Column('scope', sa.String(length=20), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('concept_indices', sa.JSON(), nullable=False),
    sa.Column('note', sa.Text(), nullable=False),
    sa.Column('created_by', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('expires_at', sa.DateTime(), nullable=True),
    sa.Column('revoked_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['created_by'], ['users.id'], name=op.f('fk_share_links_created_by_users'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_share_links_run_id_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_share_links')),
    sa.UniqueConstraint('token_hash', name=op.f('uq_share_links_token_hash'))
    )
    with op.batch_alter_table('share_links', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_share_links_run_id'), ['run_id'], unique=False)

    op.create_table('cam_images',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('concept_id', sa.Integer(), nullable=False),
    sa.Column('run_model_id', sa.Integer(), nullable=False),
    sa.Column('file_path', sa.Text(), nullable=False),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['concept_id'], ['concepts.id'], name=op.f('fk_cam_images_concept_id_concepts'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_cam_images_job_id_jobs'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['run_model_id'], ['run_models.id'], name=op.f('fk_cam_images_run_model_id_run_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_cam_images')),
    sa.UniqueConstraint('concept_id', 'run_model_id', name=op.f('uq_cam_images_concept_id'))
    )
    op.create_table('concept_defect_iou',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('generation_id', sa.Integer(), nullable=False),
    sa.Column('concept_id', sa.Integer(), nullable=False),
    sa.Column('run_model_id', sa.Integer(), nullable=False),
    sa.Column('defect_type', sa.String(length=100), nullable=False),
    sa.Column('iou', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['concept_id'], ['concepts.id'], name=op.f('fk_concept_defect_iou_concept_id_concepts'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['generation_id'], ['mining_generations.id'], name=op.f('fk_concept_defect_iou_generation_id_mining_generations'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['run_model_id'], ['run_models.id'], name=op.f('fk_concept_defect_iou_run_model_id_run_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_concept_defect_iou')),
    sa.UniqueConstraint('generation_id', 'concept_id', 'run_model_id', 'defect_type', name=op.f('uq_concept_defect_iou_generation_id'))
    )
    with op.batch_alter_table('concept_defect_iou', schema=None) as batch_op:
        batch_op.create_index('ix_concept_defect_iou_best', ['generation_id', 'defect_type', 'iou'], unique=False)
        batch_op.create_index(batch_op.f('ix_concept_defect_iou_concept_id'), ['concept_id'], unique=False)

    op.create_table('concept_histograms',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('generation_id', sa.Integer(), nullable=False),
    sa.Column('concept_id', sa.Integer(), nullable=False),
    sa.Column('run_model_id', sa.Integer(), nullable=False),
    sa.Column('bin_edges', sa.JSON(), nullable=False),
    sa.Column('counts', sa.JSON(), nullable=False),
    sa.Column('n_zero', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['concept_id'], ['concepts.id'], name=op.f('fk_concept_histograms_concept_id_concepts'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['generation_id'], ['mining_generations.id'], name=op.f('fk_concept_histograms_generation_id_mining_generations'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['run_model_id'], ['run_models.id'], name=op.f('fk_concept_histograms_run_model_id_run_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_concept_histograms')),
    sa.UniqueConstraint('generation_id', 'concept_id', 'run_model_id', name=op.f('uq_concept_histograms_generation_id'))
    )
    with op.batch_alter_table('concept_histograms', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_concept_histograms_concept_id'), ['concept_id'], unique=False)

    op.create_table('concept_model_stats',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('concept_id', sa.Integer(), nullable=False),
    sa.Column('run_model_id', sa.Integer(), nullable=False),
    sa.Column('fire_count', sa.BigInteger(), nullable=False),
    sa.Column('frequency', sa.Float(), nullable=False),
    sa.Column('share', sa.Float(), nullable=False),
    sa.Column('cofire', sa.Float(), nullable=False),
    sa.Column('mean_activation', sa.Float(), nullable=False),
    sa.Column('max_activation', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['concept_id'], ['concepts.id'], name=op.f('fk_concept_model_stats_concept_id_concepts'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['run_model_id'], ['run_models.id'], name=op.f('fk_concept_model_stats_run_model_id_run_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_concept_model_stats')),
    sa.UniqueConstraint('concept_id', 'run_model_id', name=op.f('uq_concept_model_stats_concept_id'))
    )
    with op.batch_alter_table('concept_model_stats', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_concept_model_stats_run_model_id'), ['run_model_id'], unique=False)

    op.create_table('concept_neighbours',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('generation_id', sa.Integer(), nullable=False),
    sa.Column('concept_id', sa.Integer(), nullable=False),
    sa.Column('run_model_id', sa.Integer(), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('neighbour_id', sa.Integer(), nullable=False),
    sa.Column('cosine', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['concept_id'], ['concepts.id'], name=op.f('fk_concept_neighbours_concept_id_concepts'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['generation_id'], ['mining_generations.id'], name=op.f('fk_concept_neighbours_generation_id_mining_generations'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['neighbour_id'], ['concepts.id'], name=op.f('fk_concept_neighbours_neighbour_id_concepts'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['run_model_id'], ['run_models.id'], name=op.f('fk_concept_neighbours_run_model_id_run_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_concept_neighbours')),
    sa.UniqueConstraint('generation_id', 'concept_id', 'run_model_id', 'rank', name=op.f('uq_concept_neighbours_generation_id'))
    )
    with op.batch_alter_table('concept_neighbours', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_concept_neighbours_concept_id'), ['concept_id'], unique=False)

    op.create_table('concept_tags',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('concept_id', sa.Integer(), nullable=False),
    sa.Column('tag', sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(['concept_id'], ['concepts.id'], name=op.f('fk_concept_tags_concept_id_concepts'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_concept_tags')),
    sa.UniqueConstraint('concept_id', 'tag', name=op.f('uq_concept_tags_concept_id'))
    )
    with op.batch_alter_table('concept_tags', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_concept_tags_tag'), ['tag'], unique=False)

    op.create_table('images',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('generation_id', sa.Integer(), nullable=False),
    sa.Column('store_index', sa.Integer(), nullable=False),
    sa.Column('image_key', sa.Text(), nullable=False),
    sa.Column('thumbnail_path', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['generation_id'], ['mining_generations.id'], name=op.f('fk_images_generation_id_mining_generations'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_images')),
    sa.UniqueConstraint('generation_id', 'store_index', name=op.f('uq_images_generation_id'))
    )
    op.create_table('label_history',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('concept_id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=True),
    sa.Column('username', sa.String(length=64), nullable=False),
    sa.Column('changed_at', sa.DateTime(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('old_label', sa.String(length=200), nullable=False),
    sa.Column('new_label', sa.String(length=200), nullable=False),
    sa.Column('old_description', sa.Text(), nullable=False),
    sa.Column('new_description', sa.Text(), nullable=False),
    sa.Column('old_tags', sa.JSON(), nullable=False),
    sa.Column('new_tags', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['concept_id'], ['concepts.id'], name=op.f('fk_label_history_concept_id_concepts'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_label_history_user_id_users'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_label_history'))
    )
    with op.batch_alter_table('label_history', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_label_history_concept_id'), ['concept_id'], unique=False)

    op.create_table('concept_top_images',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('generation_id', sa.Integer(), nullable=False),
    sa.Column('concept_id', sa.Integer(), nullable=False),
    sa.Column('run_model_id', sa.Integer(), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('image_id', sa.Integer(), nullable=False),
    sa.Column('activation', sa.Float(), nullable=False),
    sa.Column('max_token', sa.Integer(), nullable=False),
    sa.Column('heatmap_path', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['concept_id'], ['concepts.id'], name=op.f('fk_concept_top_images_concept_id_concepts'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['generation_id'], ['mining_generations.id'], name=op.f('fk_concept_top_images_generation_id_mining_generations'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_concept_top_images_image_id_images'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['run_model_id'], ['run_models.id'], name=op.f('fk_concept_top_images_run_model_id_run_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_concept_top_images')),
    sa.UniqueConstraint('generation_id', 'concept_id', 'run_model_id', 'rank', name=op.f('uq_concept_top_images_generation_id'))
    )
    with op.batch_alter_table('concept_top_images', schema=None) as batch_op:
        batch_op.create_index('ix_concept_top_images_concept', ['concept_id', 'generation_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_concept_top_images_image_id'), ['image_id'], unique=False)



def downgrade() -> None:
    if op.get_bind().dialect.supports_alter:
        op.drop_constraint(FK_RUN_ACTIVE_GENERATION, "runs", type_="foreignkey")
    with op.batch_alter_table('concept_top_images', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_concept_top_images_image_id'))
        batch_op.drop_index('ix_concept_top_images_concept')

    op.drop_table('concept_top_images')
    with op.batch_alter_table('label_history', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_label_history_concept_id'))

    op.drop_table('label_history')
    op.drop_table('images')
    with op.batch_alter_table('concept_tags', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_concept_tags_tag'))

    op.drop_table('concept_tags')
    with op.batch_alter_table('concept_neighbours', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_concept_neighbours_concept_id'))

    op.drop_table('concept_neighbours')
    with op.batch_alter_table('concept_model_stats', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_concept_model_stats_run_model_id'))

    op.drop_table('concept_model_stats')
    with op.batch_alter_table('concept_histograms', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_concept_histograms_concept_id'))

    op.drop_table('concept_histograms')
    with op.batch_alter_table('concept_defect_iou', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_concept_defect_iou_concept_id'))
        batch_op.drop_index('ix_concept_defect_iou_best')

    op.drop_table('concept_defect_iou')
    op.drop_table('cam_images')
    with op.batch_alter_table('share_links', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_share_links_run_id'))

    op.drop_table('share_links')
    with op.batch_alter_table('run_models', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_run_models_run_id'))

    op.drop_table('run_models')
    with op.batch_alter_table('mining_generations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_mining_generations_run_id'))

    op.drop_table('mining_generations')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_status_created')
        batch_op.drop_index(batch_op.f('ix_jobs_run_id'))

    op.drop_table('jobs')
    with op.batch_alter_table('concepts', schema=None) as batch_op:
        batch_op.drop_index('ix_concepts_run_entropy')
        batch_op.drop_index('ix_concepts_run_energy')

    op.drop_table('concepts')
    op.drop_table('users')
    op.drop_table('runs')
