"""Shutdown stops background tasks even when one swallowed its cancellation (appliance/core/stopping.py).

The bug: about one SIGTERM in seven hung after "StreamableHTTP session manager shutting down" while the
Redis broker awaited its presence heartbeat, which had lost its cancellation and gone back to waiting.
"""

import asyncio
import contextlib

from appliance.core.stopping import cancel_and_wait


async def _swallows_one_cancel(started: asyncio.Event) -> None:
    started.set()
    with contextlib.suppress(asyncio.CancelledError):  # A lost cancellation, as the heartbeat's was
        await asyncio.sleep(3600)
    await asyncio.Event().wait()  # ...then back to waiting for the next change


async def _fails() -> None:
    raise RuntimeError("boom")


async def test_a_task_that_swallowed_its_cancellation_is_cancelled_again():
    started = asyncio.Event()
    stubborn = asyncio.create_task(_swallows_one_cancel(started), name="stubborn")
    plain = asyncio.create_task(asyncio.sleep(3600))
    failed = asyncio.create_task(_fails())
    await started.wait()
    # The old `task.cancel(); await task` never returned here.
    await asyncio.wait_for(cancel_and_wait([stubborn, plain, failed], again_after=0.05), 5)
    assert stubborn.cancelled() and plain.cancelled() and isinstance(failed.exception(), RuntimeError)


async def test_the_old_way_hangs_on_such_a_task():
    started = asyncio.Event()
    stubborn = asyncio.create_task(_swallows_one_cancel(started))
    await started.wait()
    stubborn.cancel()
    done, _ = await asyncio.wait({stubborn}, timeout=0.2)
    assert not done  # What shutdown waited on until the process was killed.
    await cancel_and_wait([stubborn], again_after=0.05)
