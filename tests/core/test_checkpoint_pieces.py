"""A checkpoint delta cut into pieces of bounded rows: the same rows, in order, nothing lost."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from inventory_core import CheckpointDelta
from inventory_core._tables import TableDelta

tables = st.dictionaries(
    st.sampled_from(["stock", "reservations", "idempotency"]),
    st.builds(
        TableDelta,
        st.lists(st.tuples(st.integers(), st.integers()), max_size=30).map(tuple),
        st.lists(st.integers(), max_size=30).map(tuple),
    ),
)


@given(tables=tables, full=st.booleans(), rows_max=st.integers(1, 40))
def test_pieces_hold_every_row_in_order_within_the_bound(
    tables: dict[str, TableDelta[int, int]], full: bool, rows_max: int
) -> None:
    delta = CheckpointDelta(7, 42, full, tables)
    pieces = delta.pieces(rows_max)
    assert pieces, "an empty delta is one empty piece: its commit still moves the lsn"
    assert all(p.partition == 7 and p.lsn == 42 and p.full == full for p in pieces)
    assert all(p.row_count <= rows_max for p in pieces)
    assert all(p.row_count == rows_max for p in pieces[:-1])  # only the last one is short
    for name, whole in tables.items():
        assert tuple(u for p in pieces for u in p.tables.get(name, TableDelta((), ())).upserts) == (
            whole.upserts
        )
        assert tuple(
            r for p in pieces for r in p.tables.get(name, TableDelta((), ())).removals
        ) == (whole.removals)
    assert sum(p.row_count for p in pieces) == delta.row_count
