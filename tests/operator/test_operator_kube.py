"""kube._call: how API faults reach the reconciler, and the request timeout."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from moeplace_operator import kube
from moeplace_operator.kube import (
    ForbiddenError,
    InvalidObjectError,
    MissingObjectError,
    TransientApiError,
    _call,
)
from urllib3.exceptions import MaxRetryError, ProtocolError, ReadTimeoutError


def failing(status: int, body: str | None) -> ApiException:
    error = ApiException(status=status, reason="Reason")
    error.body = body
    return error


def raise_(error: Exception) -> None:
    raise error


def test_a_403_carries_the_api_servers_message() -> None:
    denial = "configmaps \"x\" is forbidden: ValidatingAdmissionPolicy 'p' denied request: no"
    body = json.dumps({"kind": "Status", "code": 403, "message": denial})
    with pytest.raises(ForbiddenError, match="ValidatingAdmissionPolicy 'p' denied request: no"):
        _call(lambda: raise_(failing(403, body)))


def test_a_403_without_a_status_body_falls_back_to_the_reason() -> None:
    with pytest.raises(ForbiddenError, match=r"^Reason$"):
        _call(lambda: raise_(failing(403, "not json")))


@pytest.mark.parametrize(
    ("status", "kind"),
    [(404, MissingObjectError), (409, TransientApiError), (503, TransientApiError)],
)
def test_other_faults_keep_their_mapping(status: int, kind: type[Exception]) -> None:
    with pytest.raises(kind):
        _call(lambda: raise_(failing(status, None)))


def test_a_422_carries_the_api_servers_validation_message() -> None:
    refusal = 'ConfigMap "x" is invalid: metadata.labels: Invalid value: must be 63 characters'
    body = json.dumps({"kind": "Status", "code": 422, "message": refusal})
    with pytest.raises(InvalidObjectError, match="must be 63 characters"):
        _call(lambda: raise_(failing(422, body)))


@pytest.mark.faults
@pytest.mark.parametrize(
    "error",
    [
        MaxRetryError(None, "/api/v1/configmaps", "Connection refused"),  # type: ignore[arg-type]
        ProtocolError("Connection aborted.", ConnectionResetError(104, "reset by peer")),
        ReadTimeoutError(None, "/api/v1/configmaps", "Read timed out."),  # type: ignore[arg-type]
        TimeoutError("timed out"),  # socket.timeout
        ConnectionRefusedError(111, "Connection refused"),
    ],
    ids=["MaxRetryError", "ProtocolError", "ReadTimeoutError", "socket.timeout", "refused"],
)
def test_transport_faults_while_the_apiserver_is_down_are_transient(error: Exception) -> None:
    with pytest.raises(TransientApiError):
        _call(lambda: raise_(error))


@pytest.fixture
def silent_apiserver() -> Iterator[str]:
    """Accepts connections and never answers, as an apiserver over a frozen etcd."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


@pytest.mark.faults
def test_every_request_gives_up_after_the_request_timeout(
    silent_apiserver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kube, "REQUEST_TIMEOUT_S", 0.2)
    configuration = client.Configuration()
    configuration.host = silent_apiserver
    api = kube.Kube(client.ApiClient(configuration))
    deployment = kube.TargetKind.DEPLOYMENT
    calls: list[Callable[[], object]] = [
        lambda: api.read_configmap("ns", "x"),
        lambda: api.read_secret("ns", "x"),
        lambda: api.write_configmap({"metadata": {"name": "x", "namespace": "ns"}}),
        lambda: api.write_configmap(
            {"metadata": {"name": "x", "namespace": "ns", "resourceVersion": "1"}}
        ),
        lambda: api.annotate_node("n", {"a": "b"}),
        lambda: api.read_crd("x"),
        lambda: api.apply_crd({"metadata": {"name": "x"}}, "m"),
        lambda: api.read_moedeployment("ns", "x"),
        lambda: api.patch_status("ns", "x", {}),
        lambda: api.patch_target("ns", deployment, "x", {}),
        lambda: api.read_target_hash("ns", deployment, "x"),
    ]
    for call in calls:
        started = time.monotonic()
        with pytest.raises(TransientApiError):
            call()
        # urllib3 retries a GET's read timeout (4 tries at most); without a timeout: forever
        assert time.monotonic() - started < 2.0
