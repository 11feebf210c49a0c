"""Prometheus access (issue 12): credentials from Secrets, a CA bundle with TLS verified, the
operator's allowlist, and nothing of a response body or a credential in status, Events or
logs. The reconciles run the operator's own fetch path against fake Prometheus servers (real
HTTP and TLS through prometheus-api-client and requests) with a fake Kubernetes API."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import kopf
import pytest
from fake_prometheus import FakePrometheus, load_matrix
from kubernetes.client.exceptions import ApiException
from moeplace_operator.config import OperatorConfig
from moeplace_operator.crd import build_crd
from moeplace_operator.events import EventDedup
from moeplace_operator.kube import Kube, SecretForbiddenError
from moeplace_operator.loadsource import MetricsUnavailableError, check_allowed
from moeplace_operator.nodes import node_gpus
from moeplace_operator.reconcile import Reconcile
from moeplace_operator.runtime import Runtime
from moeplace_operator.spec import MoEDeploymentSpec
from pydantic import ValidationError

pytestmark = pytest.mark.security

NOW = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
SECRET = "planted-s3cr3t-7f1c"  # in answers of the fake servers
TOKEN = "token-s3cr3t-91ab"  # in the Secrets
PASSWORD = "password-s3cr3t-2d4e"


# --- validation and the allowlist --------------------------------------------------------------


def spec_with(prometheus: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": {
            "name": "m",
            "moeLayers": 2,
            "expertsPerLayer": 4,
            "denseLayersBefore": 0,
            "hiddenLayers": 2,
        },
        "gpus": {"nodeSelector": {"pool": "a"}, "nodeCount": 2, "gpusPerNode": 2},
        "placement": {"strategy": "greedy"},
        "load": {"prometheus": prometheus},
    }


TOKEN_REF = {"bearerTokenSecret": {"name": "prom", "key": "token"}}


@pytest.mark.parametrize(
    ("prometheus", "message"),
    [
        ({"url": f"https://user:{SECRET}@prom:9090"}, "must not carry credentials"),
        ({"url": f"https://{SECRET}@prom"}, "must not carry credentials"),
        ({"url": f"https://prom/?token={SECRET}"}, "without query or fragment"),
        ({"url": "http://prom:9090", **TOKEN_REF}, "sent only over https://"),
        ({"url": "https://prom:99999"}, "valid URL with a host"),
        ({"url": "https://:9090/x"}, "valid URL with a host"),
        (
            {
                "url": "https://prom",
                **TOKEN_REF,
                "basicAuth": {
                    "username": {"name": "p", "key": "u"},
                    "password": {"name": "p", "key": "p"},
                },
            },
            "at most one of bearerTokenSecret and basicAuth",
        ),
        ({"url": "http://prom", "ca": {"configMap": {"name": "ca", "key": "ca.crt"}}}, "https"),
    ],
)
def test_unsafe_urls_refused_readably_without_echo(
    prometheus: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message) as error:
        MoEDeploymentSpec.model_validate(spec_with(prometheus))
    assert SECRET not in str(error.value)


def test_crd_refuses_the_same_at_admission() -> None:
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    prometheus = schema["properties"]["spec"]["properties"]["load"]["properties"]["prometheus"]
    messages = " | ".join(rule["message"] for rule in prometheus["x-kubernetes-validations"])
    expected_messages = ("must not carry credentials", "without query", "with a host", "https://")
    for expected in expected_messages:
        assert expected in messages
    ca = prometheus["properties"]["ca"]
    assert ca["x-kubernetes-validations"][0]["rule"] == "has(self.configMap) != has(self.secret)"


ALLOWED = ["https://prometheus.monitoring:9090", "https://thanos.example/tenant-a"]


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://prometheus.monitoring:9090", True),
        ("https://PROMETHEUS.monitoring:9090/", True),
        ("https://thanos.example:443/tenant-a/prometheus", True),
        ("https://prometheus.monitoring", False),  # another port
        ("http://prometheus.monitoring:9090", False),  # another scheme
        ("https://prometheus.monitoring.evil.example:9090", False),  # not a string prefix
        ("https://thanos.example/tenant-ab", False),  # whole path segments
        ("https://thanos.example/tenant-a/../tenant-b", False),
        ("https://thanos.example/tenant-a/%2e%2e/tenant-b", False),
    ],
)
def test_allowlist_by_origin_and_path_segments(url: str, allowed: bool) -> None:
    if allowed:
        check_allowed(url, ALLOWED)
        return
    with pytest.raises(MetricsUnavailableError, match=r"prometheus\.allowedUrls") as error:
        check_allowed(url, ALLOWED)
    assert error.value.reason == "PrometheusUrlNotAllowed"


def test_allowlist_from_the_environment() -> None:
    env = {"MOEPLACE_PROMETHEUS_ALLOWED_URLS": " https://a:9090, https://b/x ,"}
    assert OperatorConfig.from_env(env).prometheus_allowed_urls == ["https://a:9090", "https://b/x"]
    assert OperatorConfig.from_env({}).prometheus_allowed_urls == []
    with pytest.raises(ValidationError, match="not an http"):
        OperatorConfig.from_env({"MOEPLACE_PROMETHEUS_ALLOWED_URLS": "https://u:p@a"})


def test_a_refused_secret_read_keeps_nothing_of_the_answer() -> None:
    """The API server's 403 (the chart grants get only on listed Secrets)."""

    class Core:
        def read_namespaced_secret(self, name: str, namespace: str, **_: Any) -> Any:
            error = ApiException(status=403, reason="Forbidden")
            error.body = f'{{"message": "secrets {name} is forbidden {SECRET}"}}'
            raise error

    kube = Kube.__new__(Kube)
    kube.core = Core()  # type: ignore[assignment]
    with pytest.raises(SecretForbiddenError) as error:
        kube.read_secret("ns", "prom")
    assert SECRET not in str(error.value) and error.value.__cause__ is None


# --- reconciles against fake servers -----------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    ca_pem: str
    server: ssl.SSLContext  # serves a certificate for IP 127.0.0.1 signed by the CA


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """A throwaway CA and a server certificate (openssl: installed by `make tools`)."""
    d = tmp_path_factory.mktemp("tls")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=moeplace test CA")  # fmt: skip
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    signing = ["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2"]
    openssl(
        "x509", "-req", "-in", "server.csr", *signing, "-out", "server.pem", "-extfile", "san.ext"
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(d / "server.pem", d / "server.key")
    return Certificates((d / "ca.pem").read_text(), server)


class FakeKube:
    def __init__(self, secrets: dict[str, dict[str, str]], configmaps: dict[str, Any]) -> None:
        self.secrets, self.configmaps = secrets, configmaps
        self.status: dict[str, Any] = {}
        self.secret_reads: list[str] = []
        self.forbidden: set[str] = set()

    def read_configmap(self, namespace: str, name: str) -> Any:
        return self.configmaps.get(name)

    def read_secret(self, namespace: str, name: str) -> dict[str, str] | None:
        self.secret_reads.append(name)
        if name in self.forbidden:
            raise SecretForbiddenError(f"{namespace}/{name}")
        return self.secrets.get(name)

    def write_configmap(self, body: Any) -> None:
        self.configmaps[body["metadata"]["name"]] = body

    def patch_status(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self.status = patch["status"]


class Scenario:
    """One MoEDeployment reconciled once; what it left in status, Events and logs."""

    def __init__(self, events: list[dict[str, Any]], caplog: pytest.LogCaptureFixture) -> None:
        self.events, self.caplog = events, caplog
        self.kube = FakeKube(
            secrets={
                "prom": {"token": f"{TOKEN}\n", "user": "moeplace", "password": PASSWORD},
                "prom-ca": {},
            },
            configmaps={},
        )
        self.allowed: tuple[str, ...] = ()

    def reconcile(self, prometheus: dict[str, Any]) -> dict[str, dict[str, Any]]:
        runtime = Runtime(
            self.kube,  # type: ignore[arg-type]
            ThreadPoolExecutor(1),
            solver_threads=1,
            prometheus_allowed=self.allowed,
        )
        spec = spec_with({"window": "30m", "samples": 3, **prometheus})
        spec["gpus"]["speedDriftThresholdPercent"] = 10  # the per-rank queries run too
        body = {
            "metadata": {"name": "lite", "namespace": "ns", "uid": "u1", "generation": 1},
            "spec": spec,
            "status": self.kube.status,
        }
        nodes = [
            node_gpus(
                f"n{n}", {"pool": "a", **{f"gpu.moeplace.io/speed-{i}": "1" for i in (0, 1)}}, {}
            )
            for n in (0, 1)
        ]
        run = Reconcile(runtime, body, nodes, logging.getLogger("t"), EventDedup(), now=NOW)  # type: ignore[arg-type]
        asyncio.run(run.run())
        return {c["type"]: c for c in self.kube.status["conditions"]}

    def assert_never_shown(self, *secrets: str) -> None:
        shown = {
            "status": json.dumps(self.kube.status),
            "Events": json.dumps(self.events),
            "logs": self.caplog.text,
        }
        for secret in secrets:
            for where, text in shown.items():
                assert secret not in text, f"{secret!r} leaked into {where}"


@pytest.fixture
def scenario(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> Iterator[Callable[[], Scenario]]:
    events: list[dict[str, Any]] = []
    monkeypatch.setattr(kopf, "event", lambda body, **kw: events.append(kw))
    caplog.set_level(logging.DEBUG)  # urllib3's request lines and the client's debug lines too
    yield lambda: Scenario(events, caplog)


@pytest.fixture
def servers() -> Iterator[Callable[..., FakePrometheus]]:
    made: list[FakePrometheus] = []

    def make(**kwargs: Any) -> FakePrometheus:
        ranks = [{"metric": {"rank": str(r)}, "value": [NOW.timestamp(), "10"]} for r in range(4)]
        made.append(
            FakePrometheus(load_matrix(NOW), "matrix", by_query={"by (rank)": ranks}, **kwargs)
        )
        return made[-1]

    yield make
    for one in made:
        one.close()


def metrics_condition(conditions: dict[str, dict[str, Any]]) -> dict[str, Any]:
    assert conditions["Degraded"]["status"] == "True"
    return conditions["MetricsAvailable"]


@pytest.mark.parametrize(
    ("reply", "reason", "shown"),
    [
        ((500, f"internal error {SECRET}".encode(), {}), "PrometheusUnreachable", "HTTP 500"),
        ((400, json.dumps({"error": SECRET}).encode(), {}), "PrometheusUnreachable", "HTTP 400"),
        ((200, f"<html>{SECRET}</html>".encode(), {}), "PrometheusUnreachable", "not a Prometheus"),
        (
            (
                200,
                json.dumps(
                    {
                        "data": {
                            "result": [
                                {"metric": {"layer": "0", "expert": "0"}, "values": [[1, SECRET]]}
                            ]
                        }
                    }
                ).encode(),
                {},
            ),
            "BadLoadSeries",
            "not a matrix of numeric samples",
        ),
        (
            (200, json.dumps({"data": {"result": SECRET}}).encode(), {}),
            "PrometheusUnreachable",
            "not a list of series",
        ),
    ],
    ids=["500", "400-json", "html", "bad-value", "bad-result"],
)
def test_a_planted_body_never_reaches_status_events_or_logs(
    scenario: Callable[[], Scenario],
    servers: Callable[..., FakePrometheus],
    reply: tuple[int, bytes, dict[str, str]],
    reason: str,
    shown: str,
) -> None:
    s, server = scenario(), servers(reply=reply)
    condition = metrics_condition(s.reconcile({"url": server.url}))
    assert condition["reason"] == reason
    assert condition["message"].endswith(shown) or shown in condition["message"]
    assert "Prometheus at http://127.0.0.1:" in condition["message"]
    assert [e["reason"] for e in s.events] == [reason]
    s.assert_never_shown(SECRET)


def test_bearer_token_from_a_secret_over_verified_tls(
    scenario: Callable[[], Scenario],
    servers: Callable[..., FakePrometheus],
    certificates: Certificates,
) -> None:
    server = servers(authorization=f"Bearer {TOKEN}", tls=certificates.server)
    s = scenario()
    s.kube.configmaps["prom-ca"] = {
        "metadata": {"name": "prom-ca"},
        "data": {"ca.crt": certificates.ca_pem},
    }
    prometheus = {
        "url": server.url,
        **TOKEN_REF,
        "ca": {"configMap": {"name": "prom-ca", "key": "ca.crt"}},
    }
    conditions = s.reconcile(prometheus)
    assert conditions["Ready"]["status"] == "True"
    assert conditions["MetricsAvailable"]["reason"] == "Prometheus"
    # the load query and the two per-rank drift queries, all with the token (newline dropped)
    assert server.authorizations == [f"Bearer {TOKEN}"] * 3
    s.assert_never_shown(TOKEN)

    # the Secret rotated to a token the server refuses; its 401 body echoes what it got
    s.kube.secrets["prom"]["token"] = f"{SECRET}"
    condition = metrics_condition(s.reconcile(prometheus))
    assert condition["reason"] == "PrometheusUnreachable"
    assert "HTTP 401 (credentials refused)" in condition["message"]
    s.assert_never_shown(TOKEN, SECRET)


def test_basic_auth_from_secrets(
    scenario: Callable[[], Scenario],
    servers: Callable[..., FakePrometheus],
    certificates: Certificates,
) -> None:
    expected = "Basic " + base64.b64encode(f"moeplace:{PASSWORD}".encode()).decode()
    server = servers(authorization=expected, tls=certificates.server)
    s = scenario()
    s.kube.secrets["prom-ca"] = {"ca.crt": certificates.ca_pem}
    prometheus = {
        "url": server.url,
        "basicAuth": {
            "username": {"name": "prom", "key": "user"},
            "password": {"name": "prom", "key": "password"},
        },
        "ca": {"secret": {"name": "prom-ca", "key": "ca.crt"}},
    }
    assert s.reconcile(prometheus)["Ready"]["status"] == "True"
    assert server.authorizations[0] == expected
    s.assert_never_shown(PASSWORD, expected)


def test_tls_is_verified_by_default(
    scenario: Callable[[], Scenario],
    servers: Callable[..., FakePrometheus],
    certificates: Certificates,
) -> None:
    server = servers(tls=certificates.server)
    s = scenario()
    condition = metrics_condition(s.reconcile({"url": server.url}))  # the system's roots only
    assert condition["reason"] == "PrometheusUnreachable"
    assert "TLS verification failed" in condition["message"]
    assert server.queries == []  # no request went out over the unverified connection
    # the right CA but another host name than the certificate's: still refused
    s.kube.configmaps["prom-ca"] = {"data": {"ca.crt": certificates.ca_pem}}
    ca = {"ca": {"configMap": {"name": "prom-ca", "key": "ca.crt"}}}
    localhost = server.url.replace("127.0.0.1", "localhost")
    condition = metrics_condition(s.reconcile({"url": localhost, **ca}))
    assert "TLS verification failed" in condition["message"]
    assert s.reconcile({"url": server.url, **ca})["Ready"]["status"] == "True"
    s.kube.configmaps["prom-ca"] = {"data": {"ca.crt": f"not a certificate {SECRET}"}}
    condition = metrics_condition(s.reconcile({"url": server.url, **ca}))
    assert condition["reason"] == "BadPrometheusCA"
    s.assert_never_shown(SECRET)


def test_a_url_outside_the_allowlist_is_not_fetched(
    scenario: Callable[[], Scenario], servers: Callable[..., FakePrometheus]
) -> None:
    server, s = servers(), scenario()
    s.allowed = ("http://prometheus.monitoring:9090",)
    https = server.url.replace("http://", "https://")
    condition = metrics_condition(s.reconcile({"url": https, **TOKEN_REF}))
    assert condition["reason"] == "PrometheusUrlNotAllowed"
    assert "prometheus.allowedUrls: http://prometheus.monitoring:9090" in condition["message"]
    assert s.events == [
        {"type": "Warning", "reason": "PrometheusUrlNotAllowed", "message": s.events[0]["message"]}
    ]
    assert "prometheus.allowedUrls" in s.events[0]["message"]
    assert server.queries == [] and s.kube.secret_reads == []  # neither fetched nor read
    s.allowed = (server.url,)
    assert s.reconcile({"url": server.url})["Ready"]["status"] == "True"


def test_unreadable_or_missing_credentials_are_named(
    scenario: Callable[[], Scenario], servers: Callable[..., FakePrometheus]
) -> None:
    server, s = servers(), scenario()
    https = server.url.replace("http://", "https://")
    s.kube.forbidden.add("prom")
    condition = metrics_condition(s.reconcile({"url": https, **TOKEN_REF}))
    assert condition["reason"] == "PrometheusSecretForbidden"
    assert "rbac.secretReads" in condition["message"]
    s.kube.forbidden.clear()
    missing = {"bearerTokenSecret": {"name": "prom", "key": "nope"}}
    condition = metrics_condition(s.reconcile({"url": https, **missing}))
    assert condition["reason"] == "PrometheusSecretMissing"
    assert "Secret prom key nope" in condition["message"]
    s.kube.secrets["prom"]["token"] = f"{TOKEN}\r\nX-Injected: {SECRET}"
    condition = metrics_condition(s.reconcile({"url": https, **TOKEN_REF}))
    assert condition["reason"] == "BadPrometheusCredentials"
    assert server.queries == []
    s.assert_never_shown(TOKEN, SECRET)


def test_redirects_are_not_followed(
    scenario: Callable[[], Scenario], servers: Callable[..., FakePrometheus]
) -> None:
    elsewhere = servers()
    server = servers(reply=(302, b"", {"Location": f"{elsewhere.url}/api/v1/query_range"}))
    s = scenario()
    condition = metrics_condition(s.reconcile({"url": server.url}))
    assert "redirected (redirects are not followed)" in condition["message"]
    assert elsewhere.queries == []


def test_a_stored_url_with_credentials_degrades_readably(
    scenario: Callable[[], Scenario], servers: Callable[..., FakePrometheus]
) -> None:
    """An object stored before the CRD had the rule: refused by the operator, not queried."""
    server, s = servers(), scenario()
    with_credentials = server.url.replace("http://", f"http://user:{SECRET}@")
    conditions = s.reconcile({"url": with_credentials})
    degraded = conditions["Degraded"]
    assert degraded["status"] == "True" and degraded["reason"] == "InvalidSpec"
    assert "load.prometheus: Value error, url must not carry credentials" in degraded["message"]
    assert conditions["Ready"]["reason"] == "InvalidSpec"
    assert [e["reason"] for e in s.events] == ["InvalidSpec"]
    assert server.queries == []
    s.assert_never_shown(SECRET)
