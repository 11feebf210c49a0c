"""EngineShape: the placement-vs-engine shape check both engine plugins use."""

import re

import pytest
from moeplace_serving.engines.common import EngineShape

from placement import InvalidPlacementError, MoEModelShape, Placement

E, G, REDUNDANT = 8, 4, 4  # 12 slots, 3 per GPU


def engine(**overrides: object) -> EngineShape:
    args: dict[str, object] = dict(
        engine="sglang",
        hidden_layers=4,
        moe_layer_ids=(1, 2, 3),
        experts=E,
        redundant_experts=REDUNDANT,
        ep_size=G,
        redundant_flag="--ep-num-redundant-experts",
    )
    args.update(overrides)
    return EngineShape(**args)  # type: ignore[arg-type]


def placement(rows: list[list[int]] | None = None, dense: int = 1, gpus: int = G) -> Placement:
    rows = rows or [[s % E for s in range(E + REDUNDANT)]] * 3
    model = MoEModelShape(moe_layers=len(rows), experts=E, dense_layers_before=dense)
    return Placement.from_table(rows, model, gpus, "test")


def test_fitting_placement_is_accepted() -> None:
    engine().check(placement())


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        (placement(dense=0), "0 dense + 3 MoE layers, model has 1 dense"),
        (placement([[s % E for s in range(12)]] * 2), "1 dense + 2 MoE layers"),
        (placement([[s % E for s in range(16)]] * 3), "--ep-num-redundant-experts=8"),
        (placement(gpus=2), "EP size is 4"),
    ],
)
def test_mismatch_is_refused_naming_what_differs(bad: Placement, words: str) -> None:
    with pytest.raises(InvalidPlacementError, match=re.escape(words)):
        engine().check(bad)


def test_expert_ids_beyond_the_model_are_refused() -> None:
    rows = [[s % E for s in range(12)]] * 3
    with pytest.raises(InvalidPlacementError, match="experts per layer, model has 6"):
        engine(experts=6, redundant_experts=6).check(placement(rows))


def test_interleaved_moe_layers_cannot_be_described() -> None:
    with pytest.raises(ValueError, match="not one consecutive run"):
        engine(moe_layer_ids=(1, 3))


def test_same_gpu_copies_refused_where_the_engine_loads_one() -> None:
    rows = [[0, 0, 1, 2, 3, 4, 5, 6, 7, 1, 2, 3]] * 3
    with pytest.raises(InvalidPlacementError, match="loads only the first"):
        engine(same_gpu_copies_ok=False).check(placement(rows))


def test_same_gpu_copies_accepted_with_a_warning_where_the_engine_runs_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rows = [[0, 0, 1, 2, 3, 4, 5, 6, 7, 1, 2, 3]] * 3  # DeepSeek's EPLB may do this
    with caplog.at_level("WARNING"):
        engine().check(placement(rows))
    assert "3 extra copies of an expert on a GPU that holds it" in caplog.text
