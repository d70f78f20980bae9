"""Idempotent writes: the two patterns every job handler uses so that a re-run never duplicates.

- :func:`upsert`: insert rows, or update the existing row with the same key (primary key by
  default, or any unique constraint). For rows with a natural key: features, metric steps,
  streamed ablation tokens, a graph by (run_id, slug), a feature set by (run_id, name).
- :func:`replace_rows`: delete every row matching a filter, then insert the new ones, in the
  caller's transaction. For a batch that is produced whole: a feature's examples, an experiment's
  rows, a feature set's members.

Both speak ``INSERT … ON CONFLICT`` on SQLite and Postgres and batch large inputs under the
drivers' bound-parameter limits.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import delete, insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Session

MAX_BOUND_PARAMS = 30_000  # bound parameters per statement: SQLite allows 32,766, psycopg 65,535


def _chunks(rows: Sequence[Mapping[str, Any]], n_cols: int) -> Iterable[Sequence[Mapping[str, Any]]]:
    size = max(1, MAX_BOUND_PARAMS // max(n_cols, 1))
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def upsert(
    session: Session,
    model: type[DeclarativeBase],
    rows: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    *,
    key: Sequence[str] | None = None,
    update: Sequence[str] | None = None,
) -> list[Any]:
    """Insert ``rows`` or update the row with the same ``key`` (default: the primary key).

    ``update`` names the columns overwritten on conflict (default: every given non-key column).
    All rows must carry the same columns, and no two rows the same key. Returns the primary keys
    of the written rows (a scalar per row for single-column keys, a tuple otherwise); with more
    than one row their order is the database's.
    """
    table = model.__table__  # type: ignore[attr-defined]
    batch = [rows] if isinstance(rows, Mapping) else list(rows)
    if not batch:
        return []
    columns = list(batch[0])
    for row in batch:
        if list(row) != columns and set(row) != set(columns):
            raise ValueError(f"upsert rows must share columns: {sorted(columns)} vs {sorted(row)}")
    unknown = [c for c in columns if c not in table.c]
    if unknown:
        raise ValueError(f"Unknown column(s) {unknown} for table {table.name!r}")
    key = list(key) if key is not None else [c.name for c in table.primary_key.columns]
    missing = [k for k in key if k not in columns]
    if missing:
        raise ValueError(f"upsert into {table.name!r} needs the key column(s) {missing} in every row")
    to_update = list(update) if update is not None else [c for c in columns if c not in key]
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        make_insert: Any = postgresql.insert
    elif dialect == "sqlite":
        make_insert = sqlite.insert
    else:
        raise NotImplementedError(f"upsert supports SQLite and Postgres, not {dialect}")
    pk_cols = list(table.primary_key.columns)
    ids: list[Any] = []
    for chunk in _chunks(batch, len(columns)):
        stmt = make_insert(table).values(list(chunk))
        if to_update:
            stmt = stmt.on_conflict_do_update(
                index_elements=key, set_={c: stmt.excluded[c] for c in to_update}
            )
        else:
            # A no-op update (not DO NOTHING) so RETURNING still yields the existing row.
            stmt = stmt.on_conflict_do_update(index_elements=key, set_={key[0]: stmt.excluded[key[0]]})
        result = session.execute(stmt.returning(*pk_cols), execution_options={"synchronize_session": False})
        for row in result:
            ids.append(row[0] if len(pk_cols) == 1 else tuple(row))
    return ids


def replace_rows(
    session: Session,
    model: type[DeclarativeBase],
    where: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
) -> int:
    """Delete the rows of ``model`` matching ``where`` (column = value), then insert ``rows``.

    Every new row gets the ``where`` values, so what is deleted is exactly what a re-run rewrites.
    Runs in the caller's transaction: a crash in between leaves the old rows. Returns rows written.
    """
    table = model.__table__  # type: ignore[attr-defined]
    if not where:
        raise ValueError(
            f"replace_rows on {table.name!r} needs a non-empty filter (refusing to clear the table)"
        )
    unknown = [c for c in where if c not in table.c]
    if unknown:
        raise ValueError(f"Unknown filter column(s) {unknown} for table {table.name!r}")
    session.execute(delete(table).where(*(table.c[c] == v for c, v in where.items())))
    batch = [{**row, **where} for row in rows]
    if batch:
        for chunk in _chunks(batch, len(batch[0])):
            session.execute(insert(table), list(chunk))
    return len(batch)
