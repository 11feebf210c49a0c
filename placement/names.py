"""The wire names the components agree on, in one place: what the profiler writes on Nodes and
the operator reads back (and the reverse, the re-profile request), the metrics serving exports
and the operator queries, the placement ConfigMap's keys, labels and annotations that the
operator writes and serving, the engines and the rollout targets read, and the columns of the
load and transition CSVs. Plain constants that import nothing: every component may import them
(placement is the bottom layer). Changing a value changes the wire format; the tests spell the
literals out so that such a change cannot pass unnoticed."""

from __future__ import annotations

API_GROUP = "moeplace.io"  # the MoEDeployment's API group and the prefix of our own labels

# --- Nodes: profiler -> operator, and the operator's re-profile request back ----------------
NODE_PREFIX = "gpu.moeplace.io"
SPEED_LABEL_PREFIX = f"{NODE_PREFIX}/speed-"  # + the GPU's index on the node: relative speed
CURVES_ANNOTATION = f"{NODE_PREFIX}/latency-curves"  # JSON {"<index>": {"tokens", "micros"}}
PROFILED_AT_ANNOTATION = f"{NODE_PREFIX}/profiled-at"  # when the curves were taken
SHAPE_ANNOTATION = f"{NODE_PREFIX}/expert-shape"  # what was timed
REPROFILE_ANNOTATION = f"{NODE_PREFIX}/reprofile-requested-at"  # set by the operator on drift
POOL_LABEL = f"{NODE_PREFIX}/pool"  # the convention for spec.gpus.nodeSelector (examples, e2e)


def speed_label(index: int) -> str:
    """The label holding the relative speed of GPU ``index`` of a node."""
    return f"{SPEED_LABEL_PREFIX}{index}"


# --- Metrics: serving exports, the operator queries (counters, as Prometheus names them) ----
EXPERT_TOKENS_METRIC = "moe_expert_tokens_total"  # {model, layer, expert}: the load
EXPERT_TRANSITIONS_METRIC = "moe_expert_transitions_total"  # {model, layer, src, dst}
LAYER_SECONDS_METRIC = "moe_layer_compute_seconds_total"  # {model, layer, rank}: speed drift
LAYER_TOKENS_METRIC = "moe_layer_tokens_total"  # {model, layer, rank}: speed drift

# --- The placement ConfigMap: the operator writes, serving reads its keys as mounted files --
PLACEMENT_KEY = "placement.json"  # canonical placement JSON
SGLANG_KEY = "sglang.json"  # SGLang's --init-expert-location map
ENGINE_FLAGS_KEY = "engine-flags.json"  # the engine flags that must match the placement
HASH_KEY = "hash"
VERSION_KEY = "version"
HASH_ANNOTATION = f"{API_GROUP}/placement-hash"  # also on a rollout target's pod template
VERSION_ANNOTATION = f"{API_GROUP}/placement-version"
ROLLED_OUT_AT_ANNOTATION = f"{API_GROUP}/rolled-out-at"
# the EP group's nodes in rank order, comma-separated: kept in place while they stay usable
GROUP_NODES_ANNOTATION = f"{API_GROUP}/group-nodes"
# on our ConfigMaps: the owning MoEDeployment; on a workload: allowed as its rollout target
OWNER_LABEL = f"{API_GROUP}/deployment"
ROLE_LABEL = f"{API_GROUP}/role"  # placement or proposal

# --- CSV files: load and transitions (serving and the CLI write, the operator reads) --------
LOAD_CSV_COLUMNS = ("moe_layer_index", "expert_id", "count")
TRANSITIONS_CSV_COLUMNS = ("moe_layer_index", "src_expert", "dst_expert", "count")
