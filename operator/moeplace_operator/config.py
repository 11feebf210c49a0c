"""Operator-wide settings, from environment variables (the Helm chart sets them)."""

from __future__ import annotations

import os
import re

import kopf
from pydantic import BaseModel, Field, field_validator

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
    leader_election_lease: str = Field(
        default="",
        pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-.a-z0-9]*[a-z0-9])?)?$",
        description="<namespace>/<name> of the coordination.k8s.io Lease the replicas elect "
        "their one reconciling leader on (the chart's; empty: no election, this one reconciles).",
    )
    prometheus_allowed_urls: list[str] = Field(
        default_factory=list,
        description="Base URLs a MoEDeployment's load.prometheus.url must have (or be under, "
        "by whole path segments); empty: any.",
    )

    @field_validator("prometheus_allowed_urls")
    @classmethod
    def _base_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not re.match(r"^https?://[^/?#@]+(/[^?#]*)?$", url):
                raise ValueError(
                    f"MOEPLACE_PROMETHEUS_ALLOWED_URLS: {url!r} is not an http(s) base URL "
                    "without credentials, query or fragment"
                )
        return urls

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> OperatorConfig:
        values = os.environ if env is None else env
        raw = {
            "solver_workers": values.get("MOEPLACE_SOLVER_WORKERS"),
            "solver_threads": values.get("MOEPLACE_SOLVER_THREADS"),
            "metrics_port": values.get("MOEPLACE_METRICS_PORT"),
            "liveness_endpoint": values.get("MOEPLACE_LIVENESS_ENDPOINT"),
            "crd_configmap": values.get("MOEPLACE_CRD_CONFIGMAP"),
            "leader_election_lease": values.get("MOEPLACE_LEADER_ELECTION_LEASE"),
            "namespaces": _listed(values.get("MOEPLACE_NAMESPACES", "")),
            "prometheus_allowed_urls": _listed(values.get("MOEPLACE_PROMETHEUS_ALLOWED_URLS", "")),
        }
        return cls.model_validate({k: v for k, v in raw.items() if v is not None})


def _listed(text: str) -> list[str]:
    """A comma-separated environment value -> its non-empty items."""
    return [item.strip() for item in text.split(",") if item.strip()]


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
