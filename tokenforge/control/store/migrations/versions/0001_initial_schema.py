"""initial schema

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-26 14:18:16.054437

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0001'
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""

    op.create_table('audit_events',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('actor', sa.String(length=100), nullable=False),
    sa.Column('org_id', sa.String(length=40), nullable=True),
    sa.Column('action', sa.String(length=60), nullable=False),
    sa.Column('target', sa.String(length=140), nullable=True),
    sa.Column('detail', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.create_index('ix_audit_org_at', ['org_id', 'at'], unique=False)

    op.create_table('invoices',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('org_id', sa.String(length=40), nullable=False),
    sa.Column('month', sa.String(length=7), nullable=False),
    sa.Column('status', sa.String(length=10), nullable=False),
    sa.Column('total_micros', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('paid_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('org_id', 'month')
    )
    with op.batch_alter_table('invoices', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_invoices_org_id'), ['org_id'], unique=False)

    op.create_table('organizations',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('is_operator', sa.Boolean(), nullable=False),
    sa.Column('paid_micros', sa.BigInteger(), nullable=False),
    sa.Column('tier_index', sa.Integer(), nullable=False),
    sa.Column('custom_limit_micros', sa.BigInteger(), nullable=True),
    sa.Column('unlimited', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_table('rate_counters',
    sa.Column('subject', sa.String(length=60), nullable=False),
    sa.Column('window_start', sa.BigInteger(), nullable=False),
    sa.Column('num_requests', sa.Integer(), nullable=False),
    sa.Column('num_tokens', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('subject', 'window_start')
    )
    op.create_table('reservations',
    sa.Column('request_id', sa.String(length=140), nullable=False),
    sa.Column('org_id', sa.String(length=40), nullable=False),
    sa.Column('month', sa.String(length=7), nullable=False),
    sa.Column('amount_micros', sa.BigInteger(), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('request_id')
    )
    with op.batch_alter_table('reservations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_reservations_expires_at'), ['expires_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_reservations_org_id'), ['org_id'], unique=False)

    op.create_table('usage_daily',
    sa.Column('org_id', sa.String(length=40), nullable=False),
    sa.Column('day', sa.Date(), nullable=False),
    sa.Column('model', sa.String(length=200), nullable=False),
    sa.Column('num_requests', sa.BigInteger(), nullable=False),
    sa.Column('num_prompt_tokens', sa.BigInteger(), nullable=False),
    sa.Column('num_cached_tokens', sa.BigInteger(), nullable=False),
    sa.Column('num_completion_tokens', sa.BigInteger(), nullable=False),
    sa.Column('cost_micros', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('org_id', 'day', 'model')
    )
    op.create_table('usage_records',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('request_id', sa.String(length=140), nullable=False),
    sa.Column('org_id', sa.String(length=40), nullable=False),
    sa.Column('key_id', sa.String(length=40), nullable=True),
    sa.Column('model', sa.String(length=200), nullable=False),
    sa.Column('endpoint', sa.String(length=40), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('num_prompt_tokens', sa.Integer(), nullable=False),
    sa.Column('num_cached_tokens', sa.Integer(), nullable=False),
    sa.Column('num_completion_tokens', sa.Integer(), nullable=False),
    sa.Column('input_price_micros', sa.BigInteger(), nullable=False),
    sa.Column('cached_input_price_micros', sa.BigInteger(), nullable=False),
    sa.Column('output_price_micros', sa.BigInteger(), nullable=False),
    sa.Column('cost_micros', sa.BigInteger(), nullable=False),
    sa.Column('latency_ms', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('request_id')
    )
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.create_index('ix_usage_org_created', ['org_id', 'created_at'], unique=False)

    op.create_table('api_keys',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('org_id', sa.String(length=40), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('prefix', sa.String(length=40), nullable=False),
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('scopes', sa.String(length=200), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['org_id'], ['organizations.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('prefix')
    )
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_api_keys_org_id'), ['org_id'], unique=False)

    op.create_table('budgets',
    sa.Column('org_id', sa.String(length=40), nullable=False),
    sa.Column('month', sa.String(length=7), nullable=False),
    sa.Column('limit_micros', sa.BigInteger(), nullable=True),
    sa.Column('spent_micros', sa.BigInteger(), nullable=False),
    sa.Column('reserved_micros', sa.BigInteger(), nullable=False),
    sa.Column('alert_percent', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['org_id'], ['organizations.id'], ),
    sa.PrimaryKeyConstraint('org_id', 'month')
    )
    op.create_table('invoice_lines',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('invoice_id', sa.String(length=40), nullable=False),
    sa.Column('model', sa.String(length=200), nullable=False),
    sa.Column('num_requests', sa.BigInteger(), nullable=False),
    sa.Column('num_prompt_tokens', sa.BigInteger(), nullable=False),
    sa.Column('num_cached_tokens', sa.BigInteger(), nullable=False),
    sa.Column('num_completion_tokens', sa.BigInteger(), nullable=False),
    sa.Column('input_price_micros', sa.BigInteger(), nullable=False),
    sa.Column('cached_input_price_micros', sa.BigInteger(), nullable=False),
    sa.Column('output_price_micros', sa.BigInteger(), nullable=False),
    sa.Column('amount_micros', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['invoice_id'], ['invoices.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('invoice_lines', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_invoice_lines_invoice_id'), ['invoice_id'], unique=False)




def downgrade() -> None:
    """Downgrade schema."""

    with op.batch_alter_table('invoice_lines', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_invoice_lines_invoice_id'))

    op.drop_table('invoice_lines')
    op.drop_table('budgets')
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_api_keys_org_id'))

    op.drop_table('api_keys')
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.drop_index('ix_usage_org_created')

    op.drop_table('usage_records')
    op.drop_table('usage_daily')
    with op.batch_alter_table('reservations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_reservations_org_id'))
        batch_op.drop_index(batch_op.f('ix_reservations_expires_at'))

    op.drop_table('reservations')
    op.drop_table('rate_counters')
    op.drop_table('organizations')
    with op.batch_alter_table('invoices', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_invoices_org_id'))

    op.drop_table('invoices')
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.drop_index('ix_audit_org_at')

    op.drop_table('audit_events')

