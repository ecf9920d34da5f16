"""The public surface of the core is exactly ``__all__``, sorted (STYLE habit 10)."""

from __future__ import annotations

import types

import inventory_core


def test_all_is_exactly_the_public_names() -> None:
    public = {
        name
        for name, value in vars(inventory_core).items()
        if not name.startswith("_")
        and not (isinstance(value, types.ModuleType) and name != "limits")
    }
    # `annotations` comes from `from __future__ import annotations`, not a public name.
    public.discard("annotations")
    assert set(inventory_core.__all__) == public


def test_all_has_no_duplicates_and_is_sorted() -> None:
    names = inventory_core.__all__
    assert len(names) == len(set(names))
    # Sorted as ruff's RUF022 keeps it: CONSTANTS, then Classes, then functions and modules.
    assert names == sorted(names, key=_isort_style)


def _isort_style(name: str) -> tuple[int, str]:
    if name.isupper():
        return (0, name)
    return (1 if name[0].isupper() else 2, name)


def test_every_name_in_all_resolves() -> None:
    for name in inventory_core.__all__:
        assert getattr(inventory_core, name) is not None, name
