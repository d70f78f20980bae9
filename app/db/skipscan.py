"""Distinct values of an indexed column within one run, by a loose index scan.

``SELECT DISTINCT`` reads every index entry of the run (229k features at the paper's scale; Postgres has no skip
scan), which costs milliseconds of database CPU per page view. A recursive query that asks for the next larger
value, one seek at a time, reads one entry per distinct value instead: a handful of seeks for a run's categories,
labelers or collected layers. The caller's index must lead with (run_id, column).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

# (table, column) pairs with such an index; the names go into the SQL, so only these are accepted
INDEXED = {("features", "category"), ("features", "layer"), ("feature_labels", "source")}


def distinct_in_run(session: Session, table: str, column: str, run_id: int, most: int) -> list[Any]:
    """Up to ``most`` distinct non-null values of ``table.column`` among the run's rows, ascending."""
    if (table, column) not in INDEXED:
        raise ValueError(f"no (run_id, {column}) index on {table} is known for a loose index scan")
    sql = text(
        f"WITH RECURSIVE v(val, n) AS ("
        f" SELECT (SELECT min({column}) FROM {table} WHERE run_id = :run), 1"
        f" UNION ALL"
        f" SELECT (SELECT min({column}) FROM {table} WHERE run_id = :run AND {column} > v.val), n + 1"
        f" FROM v WHERE v.val IS NOT NULL AND n < :most)"
        f" SELECT val FROM v WHERE val IS NOT NULL"
    )
    return [v for (v,) in session.execute(sql, {"run": run_id, "most": most})]
