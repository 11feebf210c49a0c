"""The chart's Prometheus access values, rendered by the project's own helm (tools/build.sh):
the allowlist reaches the operator's environment, Secrets are readable only by name and only
when listed, and the values schema refuses an allowlist entry with credentials."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.helm, pytest.mark.security]


def helm_template(*values: str) -> subprocess.CompletedProcess[str]:
    bindir = subprocess.run(
        [str(ROOT / "tools/build.sh"), "--bindir"], check=True, capture_output=True, text=True
    ).stdout.strip()
    helm = Path(bindir) / "helm"
    if not helm.exists():
        pytest.fail(f"{helm} missing: run `make go-tools`")
    sets = [arg for value in values for arg in ("--set", value)]
    chart = str(ROOT / "helm/moeplace")
    command = [str(helm), "template", "t", chart, "--kube-version", "1.30.0", *sets]
    return subprocess.run(command, capture_output=True, text=True)


def rendered(*values: str) -> list[dict[str, Any]]:
    done = helm_template(*values)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def secret_rules(docs: list[dict[str, Any]]) -> list[tuple[str, str | None, dict[str, Any]]]:
    return [
        (doc["kind"], doc["metadata"].get("namespace"), rule)
        for doc in docs
        if doc["kind"] in ("Role", "ClusterRole")
        for rule in doc["rules"]
        if "secrets" in rule["resources"]
    ]


def operator_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    return {
        e["name"]: e["value"]
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    }


def test_no_secret_is_readable_by_default() -> None:
    docs = rendered()
    assert secret_rules(docs) == []
    assert operator_env(docs)["MOEPLACE_PROMETHEUS_ALLOWED_URLS"] == ""


def test_listed_secrets_by_name_in_their_namespace_only() -> None:
    docs = rendered(
        "watchNamespaces={serving,staging}",
        "rbac.secretReads[0].namespace=serving",
        "rbac.secretReads[0].names={prom-token,prom-ca}",
        "rbac.secretReads[1].namespace=staging",
        "rbac.secretReads[1].names={prom-token,prom-ca}",
        "prometheus.allowedUrls={https://prometheus.monitoring:9090,https://thanos.example/t}",
    )
    expected = {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"],
                "resourceNames": ["prom-token", "prom-ca"]}  # fmt: skip
    assert secret_rules(docs) == [("Role", "serving", expected), ("Role", "staging", expected)]
    bindings = [
        d for d in docs if d["kind"] == "RoleBinding" and "secrets" in d["metadata"]["name"]
    ]
    assert [(b["metadata"]["namespace"], b["roleRef"]["name"]) for b in bindings] == [
        ("serving", "t-moeplace-secrets"),
        ("staging", "t-moeplace-secrets"),
    ]
    allowed = operator_env(docs)["MOEPLACE_PROMETHEUS_ALLOWED_URLS"]
    assert allowed == "https://prometheus.monitoring:9090,https://thanos.example/t"


def test_cluster_wide_operator_still_reads_secrets_in_one_namespace_only() -> None:
    rules = secret_rules(
        rendered("rbac.secretReads[0].namespace=team-a", "rbac.secretReads[0].names={prom-token}")
    )
    assert [(kind, ns, rule["resourceNames"], rule["verbs"]) for kind, ns, rule in rules] == [
        ("Role", "team-a", ["prom-token"], ["get"])
    ]


def test_values_schema_refuses_credentials_in_the_allowlist() -> None:
    done = helm_template("prometheus.allowedUrls={https://user:pw@prometheus:9090}")
    assert done.returncode != 0 and "allowedUrls" in done.stderr
