from __future__ import annotations

import itertools

import pytest
from moeplace_profiler.plan import split_tokens, tile_plan, window_plan


def test_default_plan_is_tile_multiples_with_widening_steps() -> None:
    plan = tile_plan()
    assert plan == [1, 16, 32, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096]
    assert all(t % 64 == 0 for t in plan if t >= 64)
    steps = [b - a for a, b in itertools.pairwise(plan)]
    assert steps == sorted(steps)  # spacing never shrinks


@pytest.mark.parametrize("max_tokens", [1, 63, 64, 100, 4096, 10000])
def test_plan_is_sorted_unique_and_ends_at_max(max_tokens: int) -> None:
    plan = tile_plan(max_tokens)
    assert plan == sorted(set(plan))
    assert plan[-1] == max_tokens
    assert plan[0] >= 1


def test_plan_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        tile_plan(0)
    with pytest.raises(ValueError):
        tile_plan(128, tile=0)


def test_window_plan_is_dense_around_center() -> None:
    plan = window_plan(24576, hi=49152, tile=128, points=16)
    near = [t for t in plan if 12288 <= t <= 36864]
    assert len(near) >= 8
    assert plan[-1] == 49152 and plan[0] == 128
    assert all(t % 128 == 0 for t in plan)
    with pytest.raises(ValueError):
        window_plan(10, tile=128)


def test_split_tokens_is_exact_and_proportional() -> None:
    assert split_tokens(100, [3, 2, 1]) == [50, 33, 17]
    parts = split_tokens(12345, [1.0 / (i + 1) for i in range(36)])
    assert sum(parts) == 12345 and parts == sorted(parts, reverse=True)
    assert split_tokens(0, [1, 1]) == [0, 0]
    with pytest.raises(ValueError):
        split_tokens(5, [0, 0])
