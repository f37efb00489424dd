"""phase4: the plan's secondary indexes on the Spanish tables, built after the data phases loaded them.

Loading mensajes (2M rows) with these indexes in place took 12.0 s; without them 6.1 s plus 1.6 s to build them
afterwards (scripts/bench_indexes.py, BENCHMARKS.md).  They must exist before the services switch to the new
tables (the plan's phase 4).

Revision ID: phase4
Revises: phase1
"""

from __future__ import annotations

from alembic import op

revision = "phase4"
down_revision = "phase1"
branch_labels = None
depends_on = None

INDEXES = {
    "idx_clientes_ciudad": "clientes (ciudad)",
    "idx_clientes_estado": "clientes (estado)",
    "idx_proveedores_telefono": "proveedores (telefono)",
    "idx_proveedores_estado": "proveedores (estado)",
    "idx_proveedor_profesiones_profesion": "proveedor_profesiones (profesion_id)",
    "idx_servicios_proveedor_proveedor": "servicios_proveedor (proveedor_id)",
    "idx_solicitudes_servicio_cliente": "solicitudes_servicio (cliente_id)",
    "idx_mensajes_conversacion": "mensajes (conversacion_id, creado_at)",
    "idx_mensajes_telefono": "mensajes (telefono)",
    "idx_sesiones_telefono": "sesiones (telefono)",
    "idx_tareas_programadas_estado": "tareas_programadas (estado, programada_at)",
}
# (idx_clientes_telefono of the plan is left out: the UNIQUE constraint on telefono already indexes it.)


def upgrade() -> None:
    for name, on in INDEXES.items():
        op.execute(f"CREATE INDEX {name} ON {on}")
    for table in sorted({on.split()[0] for on in INDEXES.values()}):
        op.execute(f"ANALYZE {table}")


def downgrade() -> None:
    for name in INDEXES:
        op.execute(f"DROP INDEX {name}")
