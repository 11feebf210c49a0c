"""The wire names, spelled out: a change to one is a change of the format that the other
components, the chart's admission policies, dashboards and users' manifests rely on."""

from placement import names


def test_the_wire_names_are_what_the_other_side_expects() -> None:
    assert names.speed_label(3) == "gpu.moeplace.io/speed-3"
    assert {
        names.CURVES_ANNOTATION,
        names.PROFILED_AT_ANNOTATION,
        names.SHAPE_ANNOTATION,
        names.REPROFILE_ANNOTATION,
        names.POOL_LABEL,
    } == {
        "gpu.moeplace.io/latency-curves",
        "gpu.moeplace.io/profiled-at",
        "gpu.moeplace.io/expert-shape",
        "gpu.moeplace.io/reprofile-requested-at",
        "gpu.moeplace.io/pool",
    }
    assert [
        names.EXPERT_TOKENS_METRIC,
        names.EXPERT_TRANSITIONS_METRIC,
        names.LAYER_SECONDS_METRIC,
        names.LAYER_TOKENS_METRIC,
    ] == [
        "moe_expert_tokens_total",
        "moe_expert_transitions_total",
        "moe_layer_compute_seconds_total",
        "moe_layer_tokens_total",
    ]
    assert [
        names.PLACEMENT_KEY,
        names.SGLANG_KEY,
        names.ENGINE_FLAGS_KEY,
        names.HASH_KEY,
        names.VERSION_KEY,
    ] == ["placement.json", "sglang.json", "engine-flags.json", "hash", "version"]
    assert [
        names.HASH_ANNOTATION,
        names.VERSION_ANNOTATION,
        names.ROLLED_OUT_AT_ANNOTATION,
        names.GROUP_NODES_ANNOTATION,
        names.OWNER_LABEL,
        names.ROLE_LABEL,
    ] == [
        "moeplace.io/placement-hash",
        "moeplace.io/placement-version",
        "moeplace.io/rolled-out-at",
        "moeplace.io/group-nodes",
        "moeplace.io/deployment",
        "moeplace.io/role",
    ]
    assert ",".join(names.LOAD_CSV_COLUMNS) == "moe_layer_index,expert_id,count"
    assert ",".join(names.TRANSITIONS_CSV_COLUMNS) == "moe_layer_index,src_expert,dst_expert,count"
