"""Which keys are hot (``shard_router.router.detector``): pure, time as an argument."""

from __future__ import annotations

import random

from inventory_core import InventoryKey
from shard_router.router.detector import DetectorLimits, HotKeyDetector

HOT = InventoryKey("m-1", "viral", "store-1")
LIMITS = DetectorLimits(threshold_per_s=100.0, window_s=1.0, cool_windows=3, keys_max=64)


def key(number: int) -> InventoryKey:
    return InventoryKey("m-1", f"sku-{number}", "store-1")


def test_a_key_at_the_threshold_is_hot_and_one_below_is_not() -> None:
    detector = HotKeyDetector(LIMITS)
    detector.start(0.0)
    for _ in range(100):
        detector.count(HOT)
    for _ in range(99):
        detector.count(key(1))
    verdict = detector.roll(1.0, split=set())
    assert verdict.hot == (HOT,)
    assert verdict.top[0] == (HOT, 100.0)


def test_a_key_already_split_is_not_split_again() -> None:
    detector = HotKeyDetector(LIMITS)
    detector.start(0.0)
    for _ in range(500):
        detector.count(HOT)
    assert detector.roll(1.0, split={HOT}).hot == ()


def test_a_split_key_merges_after_cool_windows_in_a_row_and_a_warm_one_starts_over() -> None:
    detector = HotKeyDetector(LIMITS)
    detector.start(0.0)
    now = 0.0
    for window in range(2):  # cool twice...
        now += 1.0
        assert detector.roll(now, split={HOT}).cooled == (), window
    for _ in range(60):  # ...then warm (above a quarter of the threshold): the count restarts
        detector.count(HOT)
    now += 1.0
    assert detector.roll(now, split={HOT}).cooled == ()
    verdicts = []
    for _ in range(3):
        now += 1.0
        verdicts.append(detector.roll(now, split={HOT}).cooled)
    assert verdicts == [(), (), (HOT,)]


def test_a_hot_key_among_more_keys_than_the_summary_holds_is_never_missed() -> None:
    seed = random.randrange(2**32)
    print(f"seed={seed}")
    rng = random.Random(seed)
    detector = HotKeyDetector(LIMITS)
    detector.start(0.0)
    true_count = 0
    for _ in range(20_000):  # 10,000 distinct cold keys, and the hot one about 1 in 20
        if rng.random() < 0.05:
            detector.count(HOT)
            true_count += 1
        else:
            detector.count(key(rng.randrange(10_000)))
    assert len(detector._counts) <= LIMITS.keys_max
    assert detector._counts[HOT] >= true_count  # never below the truth
    limits = DetectorLimits(threshold_per_s=true_count, window_s=1.0, keys_max=64)
    detector.limits = limits
    assert HOT in detector.roll(1.0, split=set()).hot


def test_a_rate_is_measured_over_the_window_since_start_not_since_the_first_count() -> None:
    detector = HotKeyDetector(LIMITS)
    detector.start(0.0)
    for _ in range(150):  # 150 reserves over 2 s: 75 a second, below the threshold of 100
        detector.count(HOT)
    verdict = detector.roll(2.0, split=set())
    assert verdict.hot == () and verdict.top == ((HOT, 75.0),)
