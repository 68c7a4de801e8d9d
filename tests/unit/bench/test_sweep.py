"""The sweep over a fake target: levels in order, fresh prompts per level, disturbed levels rerun."""

import asyncio

from tokenforge.bench.client import RequestTiming
from tokenforge.bench.sweep import SweepConfig, run_sweep


class FakeTarget:
    def __init__(self):
        self.seen: list[str] = []
        self.in_flight = self.max_in_flight = 0

    async def send(self, index, conversation):
        self.seen.append(conversation[-1]["content"])
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(0.001)
        self.in_flight -= 1
        return RequestTiming(0.002, 0.001, [0.0005], 2, 7)


def test_levels_in_order_with_their_request_counts_and_fresh_prompts():
    target = FakeTarget()
    config = SweepConfig(concurrency=(1, 4), num_warmup_requests=2)
    levels = asyncio.run(run_sweep(target.send, config, log=lambda line: None))
    assert [level["concurrency"] for level in levels] == [1, 4]
    assert [level["num_requests"] for level in levels] == [8, 8]  # max(8, 2 x concurrency)
    assert len(target.seen) == 2 + 16 and len(set(target.seen)) == 18
    assert target.max_in_flight == 4
    assert all(not level["disturbed"] and level["discarded_attempts"] == [] for level in levels)


def test_a_disturbed_level_is_run_again_and_the_least_disturbed_attempt_kept():
    target = FakeTarget()
    # Other processes always use >= 0 cores: with a negative bound every attempt counts as disturbed.
    config = SweepConfig(concurrency=(2,), num_requests=3, num_warmup_requests=0, max_other_cpu_cores=-1.0,
                         max_attempts=3)
    (level,) = asyncio.run(run_sweep(target.send, config, log=lambda line: None))
    assert len(target.seen) == 9 and len(set(target.seen)) == 9
    assert level["disturbed"] and len(level["discarded_attempts"]) == 2
    assert all(a["other_cpu_cores"] >= level["monitor"]["other_cpu_cores"] for a in level["discarded_attempts"])
