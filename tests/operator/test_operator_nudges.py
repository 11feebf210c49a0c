"""The daemon's nudgeable sleep."""

import asyncio
import time

from moeplace_operator.handlers import Nudges


def test_nudge_ends_the_sleep_early_and_is_consumed() -> None:
    async def scenario() -> tuple[float, float]:
        nudges = Nudges()
        key = ("ns", "a")
        nudges.event(key)
        asyncio.get_running_loop().call_later(0.05, nudges.nudge_all)
        start = time.monotonic()
        await nudges.sleep(key, 5.0)
        nudged = time.monotonic() - start
        start = time.monotonic()
        await nudges.sleep(key, 0.1)  # the nudge was consumed: a full (short) sleep
        return nudged, time.monotonic() - start

    nudged, full = asyncio.run(scenario())
    assert nudged < 1.0 and full >= 0.09


def test_forget_drops_the_event() -> None:
    nudges = Nudges()
    nudges.nudge(("ns", "a"))
    nudges.forget(("ns", "a"))
    nudges.nudge_all()  # nothing registered: no error
