"""Load and node parsing."""

from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from moeplace_operator.loadsource import (
    MetricsUnavailableError,
    default_query,
    format_duration,
    parse_duration,
    parse_load_csv,
    parse_range_result,
)
from moeplace_operator.nodes import (
    NodeGPUs,
    NodesUnavailableError,
    build_gpu_group,
    can_change_group,
    is_usable,
    node_gpus,
    parse_speeds,
)
from moeplace_operator.spec import GPUSpec, ModelSpec

from placement.names import CURVES_ANNOTATION

MODEL = ModelSpec(
    name="m", moe_layers=2, experts_per_layer=3, dense_layers_before=0, hidden_layers=2
)
REAL_CSV = (
    Path(__file__).resolve().parents[3]
    / "shared/data/routing/deepseek-v2-lite-chat/expert_counts.csv"
)


def test_durations() -> None:
    assert parse_duration("1h30m") == timedelta(minutes=90)
    assert format_duration(timedelta(minutes=10)) == "10m"
    assert format_duration(timedelta(seconds=90)) == "90s"
    with pytest.raises(ValueError):
        parse_duration("10 minutes")


def test_default_query_escapes_model_name() -> None:
    assert 'model="a\\"b"' in default_query('a"b')


def test_range_result_to_samples() -> None:
    zeros = [
        {"metric": {"layer": str(layer), "expert": str(e)}, "values": [[0, "0"], [1, "0"]]}
        for layer in (1, 2)
        for e in range(3)
    ]
    series = [
        *zeros,
        {"metric": {"layer": "1", "expert": "2"}, "values": [[0, "5"], [1, "7"]]},
        {"metric": {"layer": "2", "expert": "0"}, "values": [[0, "0"], [1, "3"]]},
        {"metric": {"layer": "9", "expert": "0"}, "values": [[1, "3"]]},  # outside the shape
        {"metric": {"expert": "0"}, "values": [[1, "3"]]},  # no layer label
    ]
    samples = parse_range_result(series, MODEL, layer_offset=1, samples=2)
    assert samples.shape == (2, 2, 3)
    assert samples[:, 0, 2].tolist() == [5, 7] and samples[:, 1, 0].tolist() == [0, 3]
    assert samples.sum() == 15


@pytest.mark.parametrize("bad", ["NaN", "+Inf", "-3"])
def test_range_result_refuses_nan_infinite_or_negative_points(bad: str) -> None:
    series = [{"metric": {"layer": "1", "expert": "2"}, "values": [[0, "5"], [1, bad]]}]
    with pytest.raises(MetricsUnavailableError, match="layer 1, expert 2 holds NaN") as error:
        parse_range_result(series, MODEL, layer_offset=1, samples=2)
    assert error.value.reason == "BadLoadSeries"


def test_load_csv() -> None:
    text = "moe_layer_index,expert_id,count\n1,0,4\n1,2,1\n2,1,9\n"
    assert parse_load_csv(text, MODEL).tolist() == [[4, 0, 1], [0, 9, 0]]
    with pytest.raises(MetricsUnavailableError, match="outside the model shape"):
        parse_load_csv("moe_layer_index,expert_id,count\n1,5,1\n", MODEL)
    with pytest.raises(MetricsUnavailableError, match="columns"):
        parse_load_csv("layer,expert\n1,2\n", MODEL)
    for bad in ("nan", "inf", "-1"):
        with pytest.raises(MetricsUnavailableError, match="must be finite and >= 0"):
            parse_load_csv(f"moe_layer_index,expert_id,count\n1,0,4\n1,2,{bad}\n", MODEL)


@pytest.mark.skipif(not REAL_CSV.exists(), reason="../shared/data absent")
def test_real_routing_csv() -> None:
    load = parse_load_csv(
        REAL_CSV.read_text(),
        ModelSpec(name="v2", preset="deepseek-v2-lite", moe_layers=26, experts_per_layer=64),
    )
    assert load.shape == (26, 64) and (load > 0).all()


def test_speed_labels() -> None:
    labels = {"gpu.moeplace.io/speed-0": "1.05", "gpu.moeplace.io/speed-1": "x", "other": "1"}
    assert parse_speeds(labels) == {0: pytest.approx(1.05)}
    garbage = ["inf", "-inf", "nan", "1e300", "0", "-1", "", "0x1p3"]
    bad = {f"gpu.moeplace.io/speed-{i}": v for i, v in enumerate(garbage)}
    assert parse_speeds({**bad, "gpu.moeplace.io/speed-9": "0.93"}) == {9: pytest.approx(0.93)}


def _node(name: str, pool: str, speeds: list[float], curves: str = "") -> NodeGPUs:
    labels = {"pool": pool} | {f"gpu.moeplace.io/speed-{i}": str(s) for i, s in enumerate(speeds)}
    return node_gpus(name, labels, {CURVES_ANNOTATION: curves} if curves else {})


def test_gpu_group_orders_nodes_and_takes_node_count() -> None:
    nodes = [_node("n-b", "a", [0.9, 1.1]), _node("n-a", "a", [1.0]), _node("n-c", "x", [1, 1])]
    group = build_gpu_group(
        nodes, GPUSpec(node_selector={"pool": "a"}, node_count=2, gpus_per_node=2)
    )
    assert group.nodes == ["n-a", "n-b"]
    np.testing.assert_allclose(group.cluster.speeds, [1.0, 1.0, 0.9, 1.1])
    assert group.unprofiled == ["n-a/1"] and not group.profiled


def test_gpu_group_skips_not_ready_and_cordoned_nodes() -> None:
    ready = {"conditions": [{"type": "Ready", "status": "True"}]}
    assert is_usable({}, ready)
    assert not is_usable({"unschedulable": True}, ready)
    assert not is_usable({}, {"conditions": [{"type": "Ready", "status": "Unknown"}]})
    assert not is_usable({}, {})
    labels = {"pool": "a", "gpu.moeplace.io/speed-0": "1.0"}
    nodes = [
        node_gpus("n-a", labels, {}, usable=False),
        node_gpus("n-b", labels, {}),
        node_gpus("n-c", labels, {}),
    ]
    spec = GPUSpec(node_selector={"pool": "a"}, node_count=2, gpus_per_node=1)
    assert build_gpu_group(nodes, spec).nodes == ["n-b", "n-c"]
    with pytest.raises(NodesUnavailableError, match="1 of them NotReady or cordoned"):
        build_gpu_group(nodes[:2], spec)
    assert can_change_group({"pool": "a"}, nodes[0], node_gpus("n-a", labels, {}))  # nudges


def test_gpu_group_needs_enough_nodes() -> None:
    with pytest.raises(NodesUnavailableError) as error:
        build_gpu_group([], GPUSpec(node_selector={"pool": "a"}, node_count=2))
    assert error.value.reason == "NotEnoughNodes"


def test_curves_used_only_when_complete() -> None:
    one = '{"tokens": [0, 100], "micros": [0, 50]}'
    curve = f'{{"0": {one}, "1": {one}}}'
    spec = GPUSpec(node_selector={"pool": "a"}, node_count=1, gpus_per_node=2)
    assert build_gpu_group([_node("n", "a", [1, 1], curve)], spec).cluster.has_curves
    partial = f'{{"0": {one}}}'
    assert not build_gpu_group([_node("n", "a", [1, 1], partial)], spec).cluster.has_curves
    assert not build_gpu_group([_node("n", "a", [1, 1], "garbage")], spec).cluster.has_curves


def test_prometheus_load_query_ends_at_the_last_sub_window_boundary() -> None:
    """Ticks within one sub-window send the same range query (same samples, same inputs
    fingerprint: no re-solve, no status write); the next sub-window moves it by one step."""
    from datetime import UTC, datetime

    from fake_prometheus import FakePrometheus
    from moeplace_operator.loadsource import PrometheusSource, fetch_prometheus
    from moeplace_operator.spec import PrometheusLoad

    series = [
        {"metric": {"layer": str(layer), "expert": str(e)}, "values": [[1_700_000_000, "5"]]}
        for layer in (1, 2)
        for e in range(3)
    ]
    prometheus = FakePrometheus(series, result_type="matrix")
    try:
        source = PrometheusSource(
            PrometheusLoad(url=prometheus.url, window="30m", samples=3, layer_offset=1)
        )
        for minute, second in ((0, 10), (9, 59), (10, 1)):
            fetch_prometheus(source, MODEL, datetime(2026, 1, 1, 8, minute, second, tzinfo=UTC))
    finally:
        prometheus.close()
    ends = [float(q["end"][0]) for q in prometheus.queries]
    starts = [float(q["start"][0]) for q in prometheus.queries]
    eight = datetime(2026, 1, 1, 8, 0, tzinfo=UTC).timestamp()
    assert ends == [eight, eight, eight + 600]
    assert starts == [eight - 1200, eight - 1200, eight - 600]  # three 10-minute sub-windows


def test_prometheus_load_hedges_over_bootstrap_or_sub_windows() -> None:
    """Even dispatch: the solver hedges over bootstrap resamples of the sub-windows' mean;
    speed-aware dispatch (scored batch by batch): over the sub-windows themselves."""
    from datetime import UTC, datetime

    from fake_prometheus import FakePrometheus
    from moeplace_operator.loadsource import PrometheusSource, fetch_prometheus
    from moeplace_operator.spec import PrometheusLoad

    def one(layer: str, expert: str, values: list[float]) -> dict[str, object]:
        points = [[1_700_000_000 + 600 * k, str(v)] for k, v in enumerate(values)]
        return {"metric": {"layer": layer, "expert": expert}, "values": points}

    result = [one("1", "0", [5, 9, 1]), one("1", "2", [2, 2, 8]), one("2", "1", [4, 4, 4])]
    result += [one(*cell, [0, 0, 0]) for cell in (("1", "1"), ("2", "0"), ("2", "2"))]
    prometheus = FakePrometheus(result, result_type="matrix")
    try:
        spec = PrometheusLoad(url=prometheus.url, window="30m", samples=3, layer_offset=1)
        now = datetime(2026, 1, 1, tzinfo=UTC)
        windows = fetch_prometheus(PrometheusSource(spec), MODEL, now, dispatch="speed-aware")
        hedged = fetch_prometheus(PrometheusSource(spec), MODEL, now)
    finally:
        prometheus.close()
    assert windows.samples is not None and hedged.samples is not None
    assert windows.samples[:, 0, 0].tolist() == [5, 9, 1]  # the sub-windows as they came
    assert hedged.samples.shape[0] == 32 and "32 bootstrap samples" in hedged.window
    # the load is a mean of the sub-windows: summation order makes it 4.999999999999999 at times
    np.testing.assert_allclose(hedged.load, [[5.0, 0.0, 4.0], [0.0, 4.0, 0.0]])
    np.testing.assert_allclose(windows.load, hedged.load)
    # bootstrap samples keep each layer's tokens and spread over the experts' shares
    assert np.allclose(hedged.samples.sum(axis=2), hedged.load.sum(axis=1))
    assert hedged.samples[:, 0, 0].std() > 0
