"""The MoEDeployment API (moeplace.io/v1alpha1) as pydantic models: the single source of truth
for the CRD schema (``crd.py`` generates ``crds/`` from them) and the typed view the operator
reads. Field descriptions become ``kubectl explain`` text; CEL rules live next to the fields."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from placement.evaluate import Dispatch as DispatchRule
from placement.names import API_GROUP, PLACEMENT_KEY
from placement.policy import RolloutMode
from placement.presets import PRESETS, ModelLayout, agreed, check_shape, preset_layout

GROUP = API_GROUP
VERSION = "v1alpha1"
KIND = "MoEDeployment"
PLURAL = "moedeployments"
SINGULAR = "moedeployment"
SHORT_NAMES = ["moed"]
# the name is the value of the placement ConfigMaps' owner label, which Kubernetes caps at 63
MAX_NAME_LENGTH = 63

# at most 5 digits a part: every duration converts (Python's timedelta, CEL's duration())
DURATION_PATTERN = r"^([0-9]{1,5}(ms|s|m|h|d))+$"
Duration = Annotated[str, Field(pattern=DURATION_PATTERN, max_length=32)]
_DURATION_PART = re.compile(r"([0-9]+)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
# Key of a ConfigMap's or Secret's data, as the API server allows it.
ConfigMapKey = Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")]
# PromQL is sent as a URL parameter: a cap keeps requests and error messages bounded.
MAX_QUERY_LENGTH = 4096
# Physical slots over all MoE layers: bounds the solver's model and keeps the placement
# ConfigMap (canonical JSON plus SGLang's map) well under its 1 MiB.
MAX_TOTAL_SLOTS = 65536
MAX_SEED = 2**31 - 1  # CP-SAT's random_seed is a 32-bit int


def duration_seconds(text: str) -> float:
    """``1h30m``, ``10m``, ``45s``, ``1d``, ``250ms`` -> seconds (the Duration pattern)."""
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    return sum(int(n) * _UNIT_SECONDS[u] for n, u in parts)


DNSName = Annotated[
    str, Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
]


def cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    """One ``x-kubernetes-validations`` entry."""
    entry = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    return entry


def validations(*rules: dict[str, str]) -> dict[str, Any]:
    return {"x-kubernetes-validations": list(rules)}


class Camel(BaseModel):
    # hide_input_in_errors: a refused value (a URL with credentials) is never echoed in errors
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        frozen=True,
        hide_input_in_errors=True,
    )


def _preset_rules() -> list[dict[str, str]]:
    """CEL: each explicit field given with a named preset must match the preset's value."""
    fields = {
        "moeLayers": "moe_layers",
        "expertsPerLayer": "experts",
        "denseLayersBefore": "dense_layers_before",
        "hiddenLayers": "hidden_layers",
    }
    rules = []
    for field, attribute in fields.items():
        table = ", ".join(
            f"'{name}': {getattr(p.layout, attribute)}" for name, p in PRESETS.items()
        )
        rules.append(
            cel(
                f"!has(self.preset) || !has(self.{field}) || "
                f"self.{field} == {{{table}}}[self.preset]",
                f"{field} must match model.preset's",
                f".{field}",
            )
        )
    return rules


class ModelSpec(Camel):
    """The MoE model served: its metric label and its shape. Where the MoE layers sit among
    the hidden layers is never assumed: give `preset`, or `denseLayersBefore` and
    `hiddenLayers` (both may be given; they must agree)."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel("self == oldSelf", "model shape is immutable: create a new MoEDeployment"),
            cel(
                "self.topK <= self.expertsPerLayer",
                "topK must not exceed expertsPerLayer",
                ".topK",
            ),
            cel(
                "has(self.preset) || (has(self.denseLayersBefore) && has(self.hiddenLayers))",
                "give model.preset, or model.denseLayersBefore and model.hiddenLayers (the "
                "engine's per-hidden-layer map needs both)",
            ),
            cel(
                "!has(self.denseLayersBefore) || !has(self.hiddenLayers) || "
                "self.denseLayersBefore + self.moeLayers <= self.hiddenLayers",
                "denseLayersBefore + moeLayers must not exceed hiddenLayers",
                ".hiddenLayers",
            ),
            *_preset_rules(),
        )
    )

    name: str = Field(
        min_length=1,
        max_length=128,
        description="Model name: the `model` label of moe_expert_tokens_total in Prometheus.",
    )
    preset: str | None = Field(
        default=None,
        max_length=64,
        description="A published model whose layout is known (hidden layers, dense layers "
        "before the first MoE layer, experts), from its Hugging Face config.json: "
        f"{', '.join(PRESETS)}. moeLayers and expertsPerLayer must match it.",
        json_schema_extra={"enum": list(PRESETS)},
    )
    moe_layers: int = Field(ge=1, le=512, description="Number of MoE layers (rows of the map).")
    experts_per_layer: int = Field(
        ge=1, le=4096, description="Routed (logical) experts per MoE layer."
    )
    top_k: int = Field(default=1, ge=1, le=64, description="Experts each token is routed to.")
    dense_layers_before: int | None = Field(
        default=None,
        ge=0,
        le=512,
        description="Dense hidden layers before the first MoE layer: rows padded in SGLang's "
        "--init-expert-location map (1 for DeepSeek-V2-Lite, 3 for DeepSeek-V3, 0 for "
        "Mixtral and Qwen-MoE). Required without preset (never assumed 0).",
    )
    hidden_layers: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="The model's hidden (decoder) layers, dense ones included "
        "(num_hidden_layers of its config.json): rows of SGLang's map. Required without "
        "preset.",
    )
    expert_bytes: int = Field(
        default=0, ge=0, description="Bytes of one expert's weights (migration cost estimate)."
    )

    @model_validator(mode="after")
    def _layout_known(self) -> ModelSpec:
        self.layout()
        return self

    def layout(self) -> ModelLayout:
        """The model's layout from the preset and/or the explicit fields (which must agree)."""
        dense: list[tuple[str, int]] = []
        hidden: list[tuple[str, int]] = []
        if self.preset is not None:
            origin = f"model.preset {self.preset}"
            preset = preset_layout(self.preset)
            check_shape(preset, origin, self.moe_layers, self.experts_per_layer)
            dense.append((origin, preset.dense_layers_before))
            hidden.append((origin, preset.hidden_layers))
        if self.dense_layers_before is not None:
            dense.append(("model.denseLayersBefore", self.dense_layers_before))
        if self.hidden_layers is not None:
            hidden.append(("model.hiddenLayers", self.hidden_layers))
        before = agreed("dense layers before the first MoE layer", dense)
        layers = agreed("hidden layers", hidden)
        if before is None or layers is None:
            raise ValueError("give model.preset, or model.denseLayersBefore and model.hiddenLayers")
        return ModelLayout(
            hidden_layers=layers,
            dense_layers_before=before,
            moe_layers=self.moe_layers,
            experts=self.experts_per_layer,
            top_k=min(self.top_k, self.experts_per_layer),
        )


class GPUSpec(Camel):
    """The GPUs of the expert-parallel group: which nodes, how many GPUs each."""

    node_selector: dict[str, str] = Field(
        min_length=1,
        description="Labels selecting the nodes of the EP group (matchLabels semantics). "
        "Nodes are ordered by name; GPU speeds come from their gpu.moeplace.io/speed-<index> "
        "labels.",
    )
    node_count: int = Field(
        ge=1,
        le=1024,
        description="Nodes in the EP group. The first nodeCount selected nodes (by name) are "
        "used; fewer makes the MoEDeployment Degraded and keeps the last placement.",
    )
    gpus_per_node: int = Field(default=8, ge=1, le=64, description="GPUs per node in the group.")
    speed_drift_threshold_percent: float = Field(
        default=10.0,
        ge=0,
        le=1000,
        description="With load.prometheus: compare each GPU's measured relative speed (rank r "
        "= GPU r of the group; tokens/s from moe_layer_tokens_total and "
        "moe_layer_compute_seconds_total over load.prometheus.window) with its speed label; "
        "beyond this many percent GPUsProfiled turns False (SpeedDrift) and the node is "
        "annotated gpu.moeplace.io/reprofile-requested-at. 0 disables.",
    )


class Strategy(StrEnum):
    CPSAT = "cpsat"
    GREEDY = "greedy"
    EPLB = "eplb"
    EPLB_GLOBAL = "eplb-global"
    ROUND_ROBIN = "round-robin"


class Dispatch(StrEnum):
    EVEN = "even"
    SPEED_AWARE = "speed-aware"

    @property
    def rule(self) -> DispatchRule:
        """The placement library's name for it (``SolveOptions.dispatch``, ``evaluate``)."""
        return "speed-aware" if self is Dispatch.SPEED_AWARE else "even"


class Hedge(StrEnum):
    EXPECTED = "expected"
    ROBUST = "robust"


class PlacementSpec(Camel):
    """How to compute the placement."""

    strategy: Strategy = Field(
        default=Strategy.CPSAT,
        description="Solver: cpsat (optimal or with a proven gap), greedy, eplb or "
        "eplb-global (DeepSeek's speed-blind baseline: hierarchical with groups = nodes, or "
        "its global policy) or round-robin.",
    )
    dispatch: Dispatch = Field(
        default=Dispatch.EVEN,
        description="How the serving engine splits an expert's tokens over its copies: even "
        "(vLLM, SGLang: an equal share per copy) or speed-aware (moeplace_serving's "
        "dispatcher: the best split of each batch for the GPUs' speeds). cpsat places copies "
        "for it, and gains are predicted under it (per load sample for speed-aware).",
    )
    redundant_experts: int = Field(
        default=0,
        ge=0,
        le=4096,
        description="Extra physical slots for replicas of hot experts "
        "(SGLang --ep-num-redundant-experts).",
    )
    time_limit_seconds: float = Field(
        default=10.0, gt=0, le=600, description="Solver wall-clock limit per solve."
    )
    hedge: Hedge = Field(
        default=Hedge.EXPECTED,
        description="expected: minimise the mean straggler time over load samples; robust: "
        "the worst sample.",
    )
    traffic_weight: float = Field(
        default=0.0,
        ge=0,
        le=1e6,
        description="Cost of one token changing GPU between consecutive layers, in straggler "
        "time units (0 ignores traffic). Needs layer-to-layer transitions "
        "(load.static.transitionsKey or load.prometheus.transitionsQuery); without them the "
        "placement is solved without this term and PlacementSolved says why.",
    )
    migration_weight: float = Field(
        default=0.0,
        ge=0,
        le=1e6,
        description="Cost of moving one expert copy, in straggler time units (0: replan freely).",
    )
    seed: int = Field(
        default=0, ge=0, le=MAX_SEED, description="Solver random seed (reproducible plans)."
    )


class KeyRef(Camel):
    """One key of a Secret or ConfigMap in the MoEDeployment's namespace."""

    name: DNSName = Field(description="Object name in the MoEDeployment's namespace.")
    key: ConfigMapKey = Field(description="Key in its data.")


class BasicAuth(Camel):
    """HTTP basic auth, both parts read from Secrets."""

    username: KeyRef = Field(description="Secret key holding the user name.")
    password: KeyRef = Field(description="Secret key holding the password.")


class CABundle(Camel):
    """PEM CA certificates that sign the Prometheus server's certificate: exactly one of
    configMap and secret."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "has(self.configMap) != has(self.secret)", "set exactly one of configMap and secret"
            )
        )
    )

    config_map: KeyRef | None = Field(default=None, description="ConfigMap key holding the PEM.")
    secret: KeyRef | None = Field(default=None, description="Secret key holding the PEM.")


# Readable refusals of URLs that would echo credentials or are not a base URL; the same rules
# as CEL (admission) and in pydantic (the operator's and the CLI's own reading).
URL_CREDENTIALS = "^https?://[^/?#]*@"
URL_QUERY = "[?#]"
URL_MESSAGES = {
    URL_CREDENTIALS: "url must not carry credentials (user:password@host); use "
    "bearerTokenSecret or basicAuth",
    URL_QUERY: "url must be a base URL, without query or fragment",
}
CREDENTIALS_NEED_HTTPS = "credentials (bearerTokenSecret, basicAuth) are sent only over https://"
CA_NEEDS_HTTPS = "ca is used only with an https:// url"
SUB_WINDOW_TOO_SHORT = (
    "window / samples must be at least 1s: each sub-window is one step of the range query"
)
HALF_LIFE_ZERO = "halfLife must be longer than 0"


class PrometheusLoad(Camel):
    """Read per-expert token counts from Prometheus."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            *(
                cel(f"!self.url.matches('{rule}')", message)
                for rule, message in URL_MESSAGES.items()
            ),
            cel(
                "isURL(self.url) && url(self.url).getHostname() != ''",
                "url must be a valid URL with a host",
            ),
            cel(
                "!has(self.bearerTokenSecret) || !has(self.basicAuth)",
                "set at most one of bearerTokenSecret and basicAuth",
            ),
            cel(
                "(!has(self.bearerTokenSecret) && !has(self.basicAuth)) || "
                "self.url.startsWith('https://')",
                CREDENTIALS_NEED_HTTPS,
            ),
            cel("!has(self.ca) || self.url.startsWith('https://')", CA_NEEDS_HTTPS),
            # CEL's duration() has no days; any whole day is far more than 60 sub-windows
            cel(
                "self.window.matches('[1-9][0-9]*d') || (!self.window.contains('d') && "
                "duration(self.window).getSeconds() >= self.samples)",
                SUB_WINDOW_TOO_SHORT,
                ".window",
            ),
            cel(
                "!has(self.halfLife) || self.halfLife.matches('[1-9]')",
                HALF_LIFE_ZERO,
                ".halfLife",
            ),
        ),
    )

    url: str = Field(
        min_length=1,
        max_length=2048,
        pattern=r"^https?://",
        description="Prometheus base URL, e.g. https://prometheus.monitoring:9090; no "
        "credentials, query or fragment. The operator's allowlist (chart value "
        "prometheus.allowedUrls) may restrict it.",
    )
    bearer_token_secret: KeyRef | None = Field(
        default=None,
        description="Secret key holding a bearer token sent as `Authorization: Bearer` "
        "(https only; the operator needs get on the Secret: chart value "
        "rbac.secretReads).",
    )
    basic_auth: BasicAuth | None = Field(
        default=None, description="HTTP basic auth from Secrets (https only)."
    )
    ca: CABundle | None = Field(
        default=None,
        description="CA bundle the server certificate is verified against (instead of the "
        "public roots). TLS is always verified.",
    )
    query: str | None = Field(
        default=None,
        max_length=MAX_QUERY_LENGTH,
        description="PromQL returning one series per (layer, expert) with labels `layer` and "
        "`expert`; `$window` is replaced by the sub-window length. Default: "
        'sum by (layer, expert) (increase(moe_expert_tokens_total{model="<name>"}[$window])).',
    )
    window: Duration = Field(
        default="1h",
        description="History to calibrate on. Long windows are better than eager re-solving "
        "on the last few minutes.",
    )
    samples: int = Field(
        default=6,
        ge=1,
        le=60,
        description="Sub-windows the window is split into. The load is their (decayed) mean; "
        "the solver hedges over bootstrap resamples of them (even dispatch) or over the "
        "sub-windows themselves (speed-aware dispatch, scored batch by batch).",
    )
    half_life: Duration | None = Field(
        default=None,
        description="Exponential decay half-life weighting recent sub-windows; unset: equal "
        "weights.",
    )
    layer_offset: int = Field(
        default=0,
        ge=0,
        le=1024,
        description="Value of the `layer` label of the first MoE layer (1 when layers are "
        "numbered by hidden layer after one dense layer).",
    )
    transitions_query: str | None = Field(
        default=None,
        max_length=MAX_QUERY_LENGTH,
        description="PromQL returning one series per (layer, src, dst) with labels `layer` "
        "(of src; numbered like the load's), `src` and `dst`: tokens with expert src in that "
        "MoE layer and dst in the next; `$window` is replaced by the whole window. Read only "
        "when placement.trafficWeight > 0. Default: sum by (layer, src, dst) "
        '(increase(moe_expert_transitions_total{model="<name>"}[$window])).',
    )

    @model_validator(mode="after")
    def _safe_endpoint(self) -> PrometheusLoad:
        for rule, message in URL_MESSAGES.items():
            if re.search(rule, self.url):
                raise ValueError(message)
        try:
            parts = urlsplit(self.url)
            valid = bool(parts.hostname) and (parts.port or 0) >= 0  # .port checks the port
        except ValueError:  # a port that is not a number in 0..65535
            valid = False
        if not valid:
            raise ValueError("url must be a valid URL with a host")
        https = self.url.startswith("https://")
        if (self.bearer_token_secret or self.basic_auth) and not https:
            raise ValueError(CREDENTIALS_NEED_HTTPS)
        if self.bearer_token_secret and self.basic_auth:
            raise ValueError("set at most one of bearerTokenSecret and basicAuth")
        if self.ca and not https:
            raise ValueError(CA_NEEDS_HTTPS)
        if duration_seconds(self.window) < self.samples:
            raise ValueError(SUB_WINDOW_TOO_SHORT)
        if self.half_life is not None and duration_seconds(self.half_life) <= 0:
            raise ValueError(HALF_LIFE_ZERO)
        return self


class StaticLoad(Camel):
    """A load CSV (moe_layer_index,expert_id,count) kept in a ConfigMap, for clusters without
    metrics."""

    config_map_name: DNSName = Field(description="ConfigMap in the MoEDeployment's namespace.")
    key: ConfigMapKey = Field(default="load.csv", description="Key holding the CSV.")
    transitions_key: ConfigMapKey = Field(
        default="transitions.csv",
        description="Key holding layer-to-layer transitions, read only when "
        "placement.trafficWeight > 0: in data, a CSV moe_layer_index,src_expert,dst_expert,"
        "count (moe_layer_index of src, numbered like the load CSV; dst is in the next MoE "
        "layer); in binaryData, the same CSV or a [L-1, E, E] .npy array, optionally gzipped "
        "(DeepSeek-V2-Lite's 102,400 pairs exceed a ConfigMap's 1 MiB as plain CSV).",
    )


class LoadSpec(Camel):
    """Where the per-expert load comes from: exactly one of prometheus or static."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "has(self.prometheus) != has(self.static)",
                "set exactly one of load.prometheus and load.static",
            )
        )
    )

    prometheus: PrometheusLoad | None = Field(default=None, description="Load from Prometheus.")
    static: StaticLoad | None = Field(default=None, description="Load from a ConfigMap CSV.")


class TargetKind(StrEnum):
    DEPLOYMENT = "Deployment"
    STATEFUL_SET = "StatefulSet"


class TargetRef(Camel):
    """A serving workload that reads the placement only at start: rolled by setting the
    pod-template annotation moeplace.io/placement-hash."""

    kind: TargetKind = Field(description="Deployment or StatefulSet (apps/v1).")
    name: DNSName = Field(description="Workload name in the MoEDeployment's namespace.")


class PinnedRef(Camel):
    """The placement git holds, in a ConfigMap (see `moeplace export`)."""

    config_map_name: DNSName = Field(description="ConfigMap in the MoEDeployment's namespace.")
    key: ConfigMapKey = Field(default=PLACEMENT_KEY, description="Key holding the placement JSON.")


class RolloutSpec(Camel):
    """When and how a new placement reaches serving."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "self.mode != 'Pinned' || has(self.pinned)",
                "rollout.pinned is required when rollout.mode is Pinned",
            )
        )
    )

    mode: RolloutMode = Field(
        default=RolloutMode.AUTO,
        description="Auto: solve and roll out. Propose: solve and publish <name>-proposal, "
        "change nothing. Pinned: roll out the placement in rollout.pinned and report its "
        "distance from the best proposal.",
    )
    min_improvement_percent: float = Field(
        default=5.0,
        ge=0,
        le=100,
        description="Roll out only when the predicted straggler time improves by more than "
        "this (hysteresis against churn).",
    )
    cooldown: Duration = Field(default="10m", description="Minimum time between two rollouts.")
    max_moved_experts: int | None = Field(
        default=None,
        ge=0,
        description="Refuse a rollout that moves more expert copies than this (unset: no "
        "limit). The first placement is never refused.",
    )
    pinned: PinnedRef | None = Field(default=None, description="Pinned mode's placement.")
    target: TargetRef | None = Field(
        default=None, description="Serving workload to roll when the placement changes."
    )


TOO_MANY_SLOTS = (
    f"moeLayers x (expertsPerLayer + placement.redundantExperts) must not exceed "
    f"{MAX_TOTAL_SLOTS} slots"
)


class MoEDeploymentSpec(Camel):
    """Desired state of a MoEDeployment: model, GPUs, solver, load source, rollout policy."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "(self.model.expertsPerLayer + self.placement.redundantExperts) % "
                "(self.gpus.nodeCount * self.gpus.gpusPerNode) == 0",
                "expertsPerLayer + placement.redundantExperts must be divisible by "
                "gpus.nodeCount * gpus.gpusPerNode (every GPU holds the same slot count)",
            ),
            cel(
                "self.model.expertsPerLayer + self.placement.redundantExperts <= "
                "self.model.expertsPerLayer * self.gpus.nodeCount * self.gpus.gpusPerNode",
                "more slots per GPU than experts: a GPU would hold two copies of one expert",
            ),
            cel(
                "self.model.moeLayers * (self.model.expertsPerLayer + "
                f"self.placement.redundantExperts) <= {MAX_TOTAL_SLOTS}",
                TOO_MANY_SLOTS,
            ),
        )
    )

    model: ModelSpec = Field(description="The MoE model served.")
    gpus: GPUSpec = Field(description="The GPUs of the expert-parallel group.")
    placement: PlacementSpec = Field(
        default=PlacementSpec(), description="How to compute the placement."
    )
    load: LoadSpec = Field(description="Where the per-expert load comes from.")
    rollout: RolloutSpec = Field(
        default=RolloutSpec(), description="When and how placements reach serving."
    )
    reconcile_interval_seconds: int = Field(
        default=60,
        ge=5,
        le=86400,
        description="Level-based re-check period (spec and node changes also trigger one).",
    )

    @model_validator(mode="after")
    def _bounded_size(self) -> MoEDeploymentSpec:
        slots = self.model.experts_per_layer + self.placement.redundant_experts
        if self.model.moe_layers * slots > MAX_TOTAL_SLOTS:
            raise ValueError(TOO_MANY_SLOTS)
        return self


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class ConditionType(StrEnum):
    READY = "Ready"
    PLACEMENT_SOLVED = "PlacementSolved"
    ROLLED_OUT = "RolledOut"
    METRICS_AVAILABLE = "MetricsAvailable"
    GPUS_PROFILED = "GPUsProfiled"
    DEGRADED = "Degraded"


class Condition(Camel):
    """Standard Kubernetes condition."""

    type: str = Field(description="Condition type.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(description="CamelCase reason.")
    message: str = Field(default="", description="Human-readable detail.")
    last_transition_time: str = Field(description="When status last changed (RFC 3339).")
    observed_generation: int = Field(default=0, description="Generation this was computed for.")


class PlacementSummary(Camel):
    """Summary of the placement in service and of the last solve; the table itself lives in
    the ConfigMap."""

    config_map: str | None = Field(default=None, description="ConfigMap holding it.")
    hash: str | None = Field(default=None, description="Content hash of the placement in service.")
    version: int | None = Field(default=None, description="Rollout counter of the ConfigMap.")
    strategy: str | None = Field(default=None, description="Solver that produced it.")
    straggler: float | None = Field(
        default=None, description="Predicted sum over layers of the slowest GPU's time."
    )
    fluid_bound: float | None = Field(
        default=None, description="Lower bound: perfectly balanced time per layer, summed."
    )
    straggler_over_bound: str | None = Field(
        default=None, description="straggler / fluidBound (1.00 is perfect)."
    )
    gain_percent: str | None = Field(
        default=None,
        description="Predicted improvement of the last solve over the placement in service "
        "(straggler time; plus trafficWeight x tokens changing GPU when transitions are used).",
    )
    gain_over_eplb_percent: str | None = Field(
        default=None,
        description="Predicted improvement over DeepSeek EPLB on the same load (same measure).",
    )
    traffic_share_percent: str | None = Field(
        default=None,
        description="Share of token transitions between consecutive MoE layers that change GPU "
        "(even dispatch) with the placement shown; set when trafficWeight > 0 and transitions "
        "are available.",
    )
    eplb_traffic_share_percent: str | None = Field(
        default=None, description="The same share for DeepSeek EPLB's placement of the same load."
    )
    moved_experts: int | None = Field(
        default=None, description="Expert copies the last solve would move."
    )
    proposed_hash: str | None = Field(default=None, description="Hash of the last solve's plan.")
    solver_gap: str | None = Field(default=None, description="Solver's relative optimality gap.")
    solved_at: str | None = Field(default=None, description="When the last solve finished.")
    rolled_out_at: str | None = Field(default=None, description="When it was rolled out.")
    load_window: str | None = Field(default=None, description="Load the last solve used.")
    gpus: int | None = Field(default=None, description="GPUs in the EP group.")


class MoEDeploymentStatus(Camel):
    """Observed state, written only by the operator."""

    observed_generation: int | None = Field(
        default=None, description="The spec generation the status describes."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready, PlacementSolved, RolledOut, MetricsAvailable, GPUsProfiled, Degraded.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    placement: PlacementSummary | None = Field(default=None, description="Placement summary.")
