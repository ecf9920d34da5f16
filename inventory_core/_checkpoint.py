"""Checkpoints: per table, the rows upserted and the keys removed since the last one.

``take`` reads every table's change log (everything, for a full checkpoint: the first one,
or after a delta was lost); ``restore`` fills every table from a checkpoint and rebuilds the
derived indexes. Both work over ``PartitionState.tables`` by name: a new table needs nothing
here, in the store or in a migration.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from ._state import PartitionState
from ._tables import TableDelta


@dataclass(frozen=True, slots=True)
class CheckpointDelta:
    """What changed since the previous checkpoint, for an upsert at ``lsn``."""

    partition: int
    lsn: int
    # Every row of every table: the store replaces what it held for the partition.
    full: bool
    tables: Mapping[str, TableDelta[Any, Any]]

    @property
    def row_count(self) -> int:
        """Rows this delta writes: what bounds one checkpoint transaction."""
        return sum(len(t.upserts) + len(t.removals) for t in self.tables.values())

    def pieces(self, rows_max: int) -> list[CheckpointDelta]:
        """The same rows in order, at most ``rows_max`` per piece (one piece if empty).

        A checkpoint's rows are written in bounded transactions and made visible together
        afterwards (persistence/store.py), so a delta may be cut anywhere, even inside one
        table of one partition.
        """
        if rows_max <= 0:
            raise ValueError("rows_max must be positive")
        pieces: list[CheckpointDelta] = []
        current: dict[str, TableDelta[Any, Any]] = {}
        room = rows_max
        for name, table in self.tables.items():
            upserts, removals = table.upserts, table.removals
            while upserts or removals:
                if room == 0:
                    pieces.append(replace(self, tables=current))
                    current, room = {}, rows_max
                taken_upserts, upserts = upserts[:room], upserts[room:]
                room -= len(taken_upserts)
                taken_removals, removals = removals[:room], removals[room:]
                room -= len(taken_removals)
                current[name] = TableDelta(taken_upserts, taken_removals)
        pieces.append(replace(self, tables=current))
        return pieces


def take(state: PartitionState, lsn: int, full: bool) -> CheckpointDelta:
    tables = {name: table.take_changes(full) for name, table in state.tables.items()}
    return CheckpointDelta(state.partition, lsn, full, tables)


def restore(state: PartitionState, rows: Mapping[str, Iterable[tuple[Any, Any]]]) -> None:
    """Fill an empty state's tables (absent names stay empty), then derive its indexes."""
    tables = state.tables
    unknown = set(rows) - set(tables)
    if unknown:
        raise ValueError(f"checkpoint holds unknown tables {sorted(unknown)}")
    for name, table_rows in rows.items():
        tables[name].load(table_rows)
    state.rebuild_indexes()
