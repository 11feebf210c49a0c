"""Operator-wide settings, from environment variables (the Helm chart sets them)."""

from __future__ import annotations

import os

import kopf
from pydantic import BaseModel, Field

from moeplace_operator.spec import GROUP


class OperatorConfig(BaseModel):
    solver_workers: int = Field(default=2, ge=1, description="Concurrent solves.")
    solver_threads: int = Field(default=1, ge=0, description="CP-SAT threads per solve (0: all).")
    metrics_port: int = Field(default=8000, ge=0, description="/metrics port (0: off).")
    liveness_endpoint: str = Field(
        default="http://0.0.0.0:8080/healthz", description="kopf --liveness URL (empty: off)."
    )
    namespaces: list[str] = Field(default_factory=list, description="Watched; empty: all.")
    crd_configmap: str = Field(
        default="",
        description="<namespace>/<name> of the ConfigMap holding the CRD to apply at start "
        "(the chart's; empty: leave the CRD alone).",
    )

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> OperatorConfig:
        values = os.environ if env is None else env
        raw = {
            "solver_workers": values.get("MOEPLACE_SOLVER_WORKERS"),
            "solver_threads": values.get("MOEPLACE_SOLVER_THREADS"),
            "metrics_port": values.get("MOEPLACE_METRICS_PORT"),
            "liveness_endpoint": values.get("MOEPLACE_LIVENESS_ENDPOINT"),
            "crd_configmap": values.get("MOEPLACE_CRD_CONFIGMAP"),
            "namespaces": [n for n in values.get("MOEPLACE_NAMESPACES", "").split(",") if n],
        }
        return cls.model_validate({k: v for k, v in raw.items() if v is not None})


def configure_kopf(settings: kopf.OperatorSettings) -> None:
    """Our own annotation prefix for kopf's bookkeeping (never kopf.zalando.org on user
    objects), no log-to-Event bridge below warnings (we post our own Events), and a bounded
    watch so a silently dropped connection is noticed."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.posting.level = 30  # logging.WARNING
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 30
