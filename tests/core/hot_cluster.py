"""A hot key's home and its buckets as separate partitions, driven through the pure core.

Each key's partition is the one its location hashes to, as the router would route it; the
courier role (carrying a transfer's credit to its target and the settle back to its source)
is the test's, so that it can carry one late, twice, or never.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from inventory_core import (
    Command,
    InventoryKey,
    Partition,
    Record,
    Step,
    StockRow,
    bucket_key,
    command_from_data,
    command_to_data,
    partition_of,
)

START_MS = 1_700_000_000_000


def partition_of_key(key: InventoryKey) -> int:
    return partition_of(key.merchant_id, key.location_id)


def bucket_numbers_apart(key: InventoryKey, count: int) -> tuple[int, ...]:
    """The first ``count`` bucket numbers whose partitions differ from the home's and each
    other's (as the splitter picks them, with one partition standing for one owner)."""
    taken = {partition_of_key(key)}
    numbers: list[int] = []
    number = 0
    while len(numbers) < count:
        number += 1
        partition = partition_of_key(bucket_key(key, number))
        if partition not in taken:
            taken.add(partition)
            numbers.append(number)
    return tuple(numbers)


@dataclass
class Cluster:
    partitions: dict[int, Partition] = field(default_factory=dict)
    records: dict[int, list[Record]] = field(default_factory=dict)
    now_ms: int = START_MS

    def tick(self, ms: int = 1) -> int:
        self.now_ms += ms
        return self.now_ms

    def partition(self, key: InventoryKey) -> Partition:
        number = partition_of_key(key)
        if number not in self.partitions:
            self.partitions[number] = Partition(number)
            self.records[number] = []
        return self.partitions[number]

    def apply(self, key: InventoryKey, command: Command) -> Step:
        partition = self.partition(key)
        step = partition.apply(command)
        for record in step.records:
            # Every record goes through the ledger's codec, as the store would keep it.
            assert command_from_data(command_to_data(record.command)) == record.command
        self.records[partition.partition].extend(step.records)
        return step

    def row(self, key: InventoryKey) -> StockRow:
        return self.partition(key).snapshot().stock.get(key) or StockRow()

    def check(self) -> None:
        for partition in self.partitions.values():
            partition.check_invariants()

    def check_replay(self) -> None:
        """Every partition rebuilt from its ledger alone is the live one."""
        for number, partition in self.partitions.items():
            replica = Partition(number)
            for record in self.records[number]:
                replica.replay(record)
            assert replica.snapshot() == partition.snapshot(), number
