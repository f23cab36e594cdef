"""Running totals in tables: add to a row, or make it. One statement per 300 rows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.db import connection


def upsert_adding(
    table: str, keys: Sequence[str], values: Sequence[str], rows: Sequence[tuple[Any, ...]]
) -> None:
    """``INSERT ... ON CONFLICT (keys) DO UPDATE SET value = value + excluded.value`` for each of
    ``values``; each row holds the keys then the values, in that order. Rows are written in
    key order (sort them), so two writers never wait on each other in a cycle; PostgreSQL
    and SQLite both take it."""
    columns = (*keys, *values)
    placeholder = "(" + ", ".join(["%s"] * len(columns)) + ")"
    additions = ", ".join(f"{v} = {table}.{v} + excluded.{v}" for v in values)
    with connection.cursor() as cursor:
        for start in range(0, len(rows), 300):
            chunk = rows[start : start + 300]
            cursor.execute(
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
                + ", ".join([placeholder] * len(chunk))
                + f" ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {additions}",
                [v for row in chunk for v in row],
            )
