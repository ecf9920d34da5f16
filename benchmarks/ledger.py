"""What the load generator saw of every reservation, spooled to disk for the audit.

The audit needs the client's side of the history: which reservations were acknowledged, in
which state the client last saw them, and which calls have an unknown fate. Kept in memory as
Python objects, that history grew to millions of tracked objects, and the generator's full
garbage collections (up to 750 ms) landed inside measured windows. So each generator process
writes one text line per reservation to a file of its own and keeps nothing: a line is
formatted, handed to a buffered file and forgotten (strings are not tracked by the
collector). ``read_ledger`` streams the files back, one ``LedgerEntry`` at a time.

A line: ``fate TAB reservation_id TAB expires_after_ms TAB merchant TAB location TAB
sku=quantity,sku=quantity...`` (every line of a cart is at one merchant and one location, as
the API requires). The harness names every id itself (``workloads.Catalogue``), so no field
holds a tab, a comma or an equals sign; ``LedgerWriter.write`` asserts it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .workloads import Key

FATES = ("active", "committed", "released", "unknown-reserve", "unknown-finish")
# The writer's buffer: a write reaches the file (one syscall into the page cache, well under
# a millisecond) every this many bytes, about 15,000 reservations of one line.
LEDGER_BUFFER_BYTES = 1 << 20


@dataclass(frozen=True)
class LedgerEntry:
    """What the client saw of one reservation. ``fate`` is one of FATES."""

    reservation_id: str  # "" when the reserve's own fate is unknown
    lines: tuple[tuple[Key, int], ...]
    fate: str
    expires_after_s: float  # wall clock: after this the server may have expired it


def encode(entry: LedgerEntry) -> str:
    first = entry.lines[0][0]
    skus = ",".join(f"{key.sku_id}={quantity}" for key, quantity in entry.lines)
    expires_after_ms = round(entry.expires_after_s * 1000)
    return (
        f"{entry.fate}\t{entry.reservation_id}\t{expires_after_ms}\t"
        f"{first.merchant_id}\t{first.location_id}\t{skus}\n"
    )


def decode(line: str) -> LedgerEntry:
    fate, reservation_id, expires_after_ms, merchant_id, location_id, skus = line.rstrip(
        "\n"
    ).split("\t")
    if fate not in FATES:
        raise ValueError(f"ledger line with an unknown fate: {line!r}")
    lines = tuple(
        (Key(merchant_id, location_id, sku_id), int(quantity))
        for sku_id, quantity in (part.split("=") for part in skus.split(","))
    )
    return LedgerEntry(reservation_id, lines, fate, int(expires_after_ms) / 1000)


class LedgerWriter:
    """One generator process's ledger file of one phase; ``close`` flushes it."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.entries = 0
        self._file: TextIO = path.open(
            "w", encoding="utf-8", newline="\n", buffering=LEDGER_BUFFER_BYTES
        )

    def write(self, entry: LedgerEntry) -> None:
        line = encode(entry)
        lines = len(entry.lines)
        counts = (line.count("\t"), line.count("\n"), line.count("="), line.count(","))
        assert counts == (5, 1, lines, lines - 1), line  # no field holds a separator
        self._file.write(line)
        self.entries += 1

    def close(self) -> None:
        self._file.close()


def ledger_files(directory: Path) -> list[Path]:
    """Every ledger file under ``directory``, in a stable order (phase, then process)."""
    return sorted(directory.glob("*.tsv")) if directory.is_dir() else []


def read_ledger(paths: Iterable[Path]) -> Iterator[LedgerEntry]:
    """Every entry of ``paths``, file by file, without holding more than one line."""
    for path in paths:
        with path.open(encoding="utf-8", newline="\n") as file:
            for line in file:
                yield decode(line)
