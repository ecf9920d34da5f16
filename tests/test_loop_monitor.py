"""The loop monitor sees a loop held by synchronous work, and starts afresh on each take."""

from __future__ import annotations

import asyncio
import gc
import time

from shard_router.common.loop_monitor import STALL_S, LoopMonitor


def test_a_held_loop_is_reported_as_a_stall_and_take_starts_afresh() -> None:
    async def body() -> None:
        monitor = LoopMonitor(period_s=0.005)
        task = asyncio.create_task(monitor.run())
        try:
            await asyncio.sleep(0.02)  # the monitor is waiting on its timer
            time.sleep(STALL_S * 2)  # noqa: ASYNC251 (holding the loop is the point)
            await asyncio.sleep(0.02)
            held = monitor.take()
            assert held.stall_max_s >= STALL_S * 2 - 0.005
            assert held.stalls >= 1
            gc.collect()  # a full collection, timed by the monitor
            fields = monitor.take_fields()
            assert fields["loop_stalls_over_50ms"] == 0  # nothing held since the take
            assert fields["gc_full_collections"] >= 1
            assert fields["gc_pause_max_ms"] > 0
        finally:
            task.cancel()

    asyncio.run(body())
