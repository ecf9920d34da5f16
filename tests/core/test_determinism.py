"""Determinism of the core (STYLE habit 7): same commands, same steps; no hidden inputs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import inventory_core
from inventory_core import (
    AdjustmentReason,
    AdjustStock,
    Command,
    Commit,
    Extend,
    InventoryKey,
    Line,
    Partition,
    Release,
    Reserve,
    SetSafetyStock,
    SetStock,
    partition_of,
)

CORE = Path(inventory_core.__file__).resolve().parent
SOURCES = sorted(CORE.glob("*.py"))
M, L = "m1", "l1"
P = partition_of(M, L)
T0 = 1_700_000_000_000


def key(sku: str) -> InventoryKey:
    return InventoryKey(M, sku, L)


def rid(lsn: int) -> str:
    return f"r{P:04d}-{lsn:010d}"


def script() -> list[Command]:
    """A scripted day: stock, carts, a sale into over-commit, expiry, retries."""
    commands: list[Command] = []
    for i, sku in enumerate(("a", "b", "c", "d")):
        commands.append(SetStock(key(sku), f"set-{sku}", 5 + i, None, T0))
    commands.append(SetSafetyStock(key("a"), "safety-a", 1, 1, T0))
    for n in range(12):
        lines = (Line(key("abcd"[n % 4]), 1 + n % 2), Line(key("abcd"[(n + 1) % 4]), 1))
        commands.append(Reserve(M, f"cart-{n}", lines, 30 + 10 * n, T0 + 1000 * n))
    commands += [
        Commit(M, "commit-1", rid(6), (), T0 + 20_000),
        Commit(M, "commit-2", rid(7), (Line(key("b"), 1),), T0 + 21_000),
        Release(M, "release-1", rid(8), T0 + 22_000),
        Extend(M, "extend-1", rid(9), 120, T0 + 23_000),
        AdjustStock(key("c"), "sale-1", -6, AdjustmentReason.SALE, T0, T0 + 24_000),
        Reserve(M, "cart-0", (Line(key("a"), 2), Line(key("b"), 1)), 30, T0 + 25_000),
        Reserve(M, "cart-0", (Line(key("a"), 1),), 30, T0 + 25_000),
        SetStock(key("d"), "cas-stale", 3, 1, T0 + 26_000),
    ]
    commands += [
        Reserve(M, f"late-{n}", (Line(key("d"), 1),), 60, T0 + 90_000 * n) for n in (1, 2, 3)
    ]
    return commands


def test_the_same_commands_on_two_fresh_partitions_give_identical_steps() -> None:
    first, second = Partition(P), Partition(P)
    for command in script():
        assert first.apply(command) == second.apply(command)
    final_ms = T0 + 10**7
    assert first.expire_due(final_ms) == second.expire_due(final_ms)
    assert first.snapshot() == second.snapshot()
    assert first.take_checkpoint() == second.take_checkpoint()


FORBIDDEN_MODULES = {"random", "time", "datetime", "uuid", "secrets", "os", "socket"}


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[str] = []
    for node in ast.walk(tree):
        where = f"{path.name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [
                f"{where} import {a.name}"
                for a in node.names
                if a.name.split(".")[0] in FORBIDDEN_MODULES
            ]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.level == 0 and node.module.split(".")[0] in FORBIDDEN_MODULES:
                found.append(f"{where} from {node.module} import")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id in {"hash", "id"}:
                found.append(f"{where} {node.func.id}()")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id in FORBIDDEN_MODULES:
                found.append(f"{where} {node.value.id}.{node.attr}")
        elif isinstance(node, ast.Name) and node.id in {"uuid4", "datetime", "random"}:
            found.append(f"{where} {node.id}")
    return found


def test_core_sources_exist() -> None:
    assert {p.name for p in SOURCES} >= {"_partition.py", "_model.py", "_codec.py"}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_core_uses_no_clock_randomness_uuid_or_builtin_hash(path: Path) -> None:
    assert _violations(path) == []


def test_the_scan_catches_what_it_forbids(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import time\nimport random as r\nfrom datetime import datetime\nfrom uuid import uuid4\n"
        "x = hash('a')\ny = time.monotonic()\n"
    )
    assert len(_violations(bad)) >= 6
