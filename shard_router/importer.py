"""``inventory import FILE``: a merchant's stock-take, as one batch of counts through the ledger.

    inventory import counts.csv --merchant-id m-1 [--address 127.0.0.1:50051] [--tls-ca ...]

The file holds absolute counts, one per line: CSV with a header naming ``sku_id``,
``location_id``, ``count`` and optionally ``counted_at_ms``, or JSON lines with those fields
(``.jsonl`` / ``.ndjson``, or ``--format``). Each line becomes a count event of the feed
``source`` ``import`` whose ``event_id`` is ``<batch_id>:<line number>``, sent with
``Ingest`` through the router (the Python client: retries, and resends of events that got
no answer). Events go in requests of at most 1,000, grouped by location (a location is one
partition), at most ``--requests-in-flight`` at once.

The batch id (``--batch-id``, else ``import-`` and a hash of the file's bytes) tags every
ledger record of the import, so that a rebuild can leave a bad batch out. Importing the same
file again changes nothing (every line is a duplicate), and an import that stopped halfway
can simply be run again. A count is "on_hand was X at counted_at": sales that occurred after
it still count against it (DESIGN section 9); a line without ``counted_at_ms`` was counted
at ``--counted-at-ms`` (default: the file's modification time, so that the same file
imported again sends the same events).

The summary: lines read, counts applied, superseded (a newer count was already applied),
duplicates, and every refused line with its number, field and reason (also in
``--report FILE``, as JSON). Exit status 0 when every line was applied, superseded or a
duplicate; 1 when a line was refused or stayed unanswered (import again to finish it).
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from inventory.v1 import inventory_pb2 as pb
from tqdm import tqdm

from .client import ChannelTLSConfig, InventoryClient, InventoryError

SOURCE = "import"
# Events per Ingest request: the API's bound.
REQUEST_EVENTS_MAX = 1000
# Lines held before they are sent, across locations: bounds the importer's memory whatever
# the file's size (a merchant's stock-take may hold millions of lines).
BUFFERED_LINES_MAX = 20_000
REQUESTS_IN_FLIGHT_DEFAULT = 8
# Refused lines printed in the summary (all of them go to --report).
REFUSED_SHOWN_MAX = 20
REQUIRED_COLUMNS = ("sku_id", "location_id", "count")
JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
STATUS = {
    pb.EVENT_ACK_STATUS_APPLIED: "applied",
    pb.EVENT_ACK_STATUS_SUPERSEDED: "superseded",
    pb.EVENT_ACK_STATUS_DUPLICATE: "duplicates",
    pb.EVENT_ACK_STATUS_REFUSED: "refused",
    pb.EVENT_ACK_STATUS_FAILED: "failed",
}


@dataclass(frozen=True, slots=True)
class Refused:
    line: int
    field: str
    reason: str


@dataclass
class Summary:
    batch_id: str
    lines: int = 0
    applied: int = 0
    superseded: int = 0
    duplicates: int = 0
    failed: int = 0
    refused: list[Refused] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.refused and not self.failed

    def as_data(self) -> dict[str, Any]:
        return {
            "batch_id": self.batch_id,
            "lines": self.lines,
            "applied": self.applied,
            "superseded": self.superseded,
            "duplicates": self.duplicates,
            "failed": self.failed,
            "refused": [_refused(r) for r in self.refused],
        }

    def text(self) -> str:
        lines = [
            f"batch {self.batch_id}: {self.lines} lines; {self.applied} counts applied, "
            f"{self.superseded} superseded, {self.duplicates} duplicates, "
            f"{len(self.refused)} refused, {self.failed} unanswered"
        ]
        for refused in self.refused[:REFUSED_SHOWN_MAX]:
            lines.append(f"  line {refused.line}: {refused.field}: {refused.reason}")
        if len(self.refused) > REFUSED_SHOWN_MAX:
            lines.append(f"  ... and {len(self.refused) - REFUSED_SHOWN_MAX} more (--report)")
        if self.failed:
            lines.append("  unanswered lines are safe to send again: run the same import again")
        return "\n".join(lines)


def _refused(refused: Refused) -> dict[str, Any]:
    return {"line": refused.line, "field": refused.field, "reason": refused.reason}


def default_batch_id(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return f"import-{digest.hexdigest()[:16]}"


# ------------------------------------------------------------------------------ reading


@dataclass(frozen=True, slots=True)
class Line:
    number: int
    event: pb.FeedEvent


def read_lines(
    stream: TextIO, file_format: str, batch_id: str, merchant_id: str, counted_at_ms: int
) -> Iterator[Line | Refused]:
    """Each line of the file as a count event, or refused with its field and reason."""
    rows = _csv_rows(stream) if file_format == "csv" else _json_rows(stream)
    for number, row in rows:
        if isinstance(row, Refused):
            yield row
            continue
        yield _line(number, row, batch_id, merchant_id, counted_at_ms)


def _csv_rows(stream: TextIO) -> Iterator[tuple[int, dict[str, Any] | Refused]]:
    reader = csv.DictReader(stream)
    missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(
            f"the CSV header must name {', '.join(REQUIRED_COLUMNS)}: {missing} missing"
        )
    for row in reader:
        yield reader.line_num, row


def _json_rows(stream: TextIO) -> Iterator[tuple[int, dict[str, Any] | Refused]]:
    for number, text in enumerate(stream, start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as error:
            yield number, Refused(number, "line", f"not JSON: {error.msg}")
            continue
        if not isinstance(row, dict):
            yield number, Refused(number, "line", "must be a JSON object")
            continue
        yield number, row


def _line(
    number: int, row: dict[str, Any], batch_id: str, merchant_id: str, counted_at_ms: int
) -> Line | Refused:
    for name in REQUIRED_COLUMNS:
        if row.get(name) in (None, ""):
            return Refused(number, name, "missing")
    count = _integer(row["count"])
    if count is None:
        return Refused(number, "count", f"not a whole number: {row['count']!r}")
    at = row.get("counted_at_ms")
    at_ms = counted_at_ms if at in (None, "") else _integer(at)
    if at_ms is None:
        return Refused(number, "counted_at_ms", f"not a whole number: {at!r}")
    event = pb.FeedEvent(
        event_id=f"{batch_id}:{number}",
        occurred_at_ms=at_ms,
        kind=pb.FEED_EVENT_KIND_COUNT,
        key=pb.InventoryKey(
            merchant_id=merchant_id, sku_id=str(row["sku_id"]), location_id=str(row["location_id"])
        ),
        count=count,
    )
    return Line(number, event)


def _integer(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        return None


# ------------------------------------------------------------------------------ sending


class Importer:
    def __init__(
        self,
        client: InventoryClient,
        merchant_id: str,
        batch_id: str,
        requests_in_flight: int,
        progress: tqdm[Any] | None,
    ) -> None:
        self.summary = Summary(batch_id)
        self._client = client
        self._merchant_id = merchant_id
        self._room = asyncio.Semaphore(requests_in_flight)
        self._progress = progress
        self._by_location: dict[str, list[Line]] = {}
        self._buffered = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def add(self, item: Line | Refused) -> None:
        self.summary.lines += 1
        if isinstance(item, Refused):
            self._answered(1, [item])
            return
        location = item.event.key.location_id
        held = self._by_location.setdefault(location, [])
        held.append(item)
        self._buffered += 1
        if len(held) >= REQUEST_EVENTS_MAX:
            await self._send(self._by_location.pop(location))
        elif self._buffered >= BUFFERED_LINES_MAX:
            await self.flush()

    async def flush(self) -> None:
        held, self._by_location = self._by_location, {}
        for lines in held.values():
            for start in range(0, len(lines), REQUEST_EVENTS_MAX):
                await self._send(lines[start : start + REQUEST_EVENTS_MAX])

    async def finish(self) -> Summary:
        await self.flush()
        while self._tasks:
            await asyncio.gather(*self._tasks)
        self.summary.refused.sort(key=lambda r: r.line)
        return self.summary

    async def _send(self, lines: list[Line]) -> None:
        self._buffered -= len(lines)
        await self._room.acquire()
        task = asyncio.create_task(self._ingest(lines))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ingest(self, lines: list[Line]) -> None:
        try:
            response = await self._client.ingest(
                self._merchant_id,
                SOURCE,
                [line.event for line in lines],
                batch_id=self.summary.batch_id,
            )
        except InventoryError as error:  # the request as a whole: every line unanswered
            self.summary.failed += len(lines)
            self._answered(len(lines), [], note=str(error))
        else:
            refused = []
            for line, ack in zip(lines, response.acks, strict=True):
                name = STATUS.get(ack.status, "failed")
                if name == "refused":
                    refused.append(Refused(line.number, ack.field, ack.reason))
                elif name == "failed":
                    self.summary.failed += 1
                else:
                    setattr(self.summary, name, getattr(self.summary, name) + 1)
            self._answered(len(lines), refused)
        finally:
            self._room.release()

    def _answered(self, count: int, refused: list[Refused], note: str = "") -> None:
        """``count`` lines are settled (``refused`` among them)."""
        self.summary.refused.extend(refused)
        if self._progress is not None:
            self._progress.update(count)
            if note:
                self._progress.write(f"unanswered: {note}")


async def run_import(
    path: Path,
    *,
    address: str,
    merchant_id: str,
    batch_id: str = "",
    file_format: str = "",
    counted_at_ms: int = 0,
    requests_in_flight: int = REQUESTS_IN_FLIGHT_DEFAULT,
    progress: bool = True,
    token: str = "",
    tls: ChannelTLSConfig | None = None,
) -> Summary:
    """Import ``path`` as the caller of ``token``, reaching the router by ``tls``; the
    summary (see the module docstring). A TLS configuration that cannot run is a
    ``ValueError`` before anything is read."""
    client = InventoryClient(address, token=token, tls=tls)
    batch_id, file_format, counted_at_ms, total = await asyncio.to_thread(
        _plan, path, batch_id, file_format, counted_at_ms
    )
    bar = tqdm(total=max(total, 0), unit="line", disable=not progress, file=sys.stderr)
    async with client:
        importer = Importer(client, merchant_id, batch_id, requests_in_flight, bar)
        with path.open(newline="", encoding="utf-8") as stream:
            for item in read_lines(stream, file_format, batch_id, merchant_id, counted_at_ms):
                await importer.add(item)
        summary = await importer.finish()
    bar.close()
    return summary


def _plan(
    path: Path, batch_id: str, file_format: str, counted_at_ms: int
) -> tuple[str, str, int, int]:
    """The import's batch id, format, default count time and line count (reads the file)."""
    batch_id = batch_id or default_batch_id(path)
    file_format = file_format or ("json" if path.suffix in JSON_SUFFIXES else "csv")
    counted_at_ms = counted_at_ms or int(path.stat().st_mtime * 1000)
    total = _count_lines(path) - (1 if file_format == "csv" else 0)
    return batch_id, file_format, counted_at_ms, total


def _count_lines(path: Path) -> int:
    with path.open("rb") as stream:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: stream.read(1 << 20), b""))
