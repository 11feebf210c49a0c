"""Thin typed wrappers over the Kubernetes API calls the reconciler makes. Synchronous (the
official client is): the reconciler runs them in worker threads. API faults are turned into
``TransientApiError`` (retry soon): the daemon retries the object after a short delay."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError as Urllib3Error

from moeplace_operator import metrics
from moeplace_operator.spec import GROUP, PLURAL, VERSION, TargetKind

Body = dict[str, Any]
T = TypeVar("T")

TEMPLATE_PATH = {TargetKind.DEPLOYMENT: "deployments", TargetKind.STATEFUL_SET: "statefulsets"}
# Every request's (connect, read) limit: a frozen etcd makes the apiserver hold a request
# until its own 60 s timeout, and one hung call must not hold a pass (or a worker) longer.
REQUEST_TIMEOUT_S = 30.0


class TransientApiError(Exception):
    """A fault worth retrying: conflict, throttling, server error, connection trouble."""


class MissingObjectError(Exception):
    """A referenced object (ConfigMap, workload) does not exist."""


class ForbiddenError(Exception):
    """RBAC or an admission policy refused the call (403); the message is the API server's,
    naming the rule or policy (e.g. "the moeplace operator may only patch a workload ...")."""


class InvalidObjectError(Exception):
    """The API server refused the object we sent as invalid (422); the message is its
    validation text (a field too long, an object over its size limit)."""


def _status_message(error: ApiException) -> str:
    """The ``message`` of the API server's Status body; the reason when there is none."""
    try:
        message = json.loads(error.body or "{}").get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message or error.reason)


class SecretForbiddenError(Exception):
    """The operator may not read a referenced Secret (RBAC)."""


def load_config() -> None:
    """In-cluster service account when there is one, else the kubeconfig (local runs, tests)."""
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]


def _call(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except ApiException as error:
        if error.status == 404:
            raise MissingObjectError(error.reason) from error
        if error.status == 403:
            raise ForbiddenError(_status_message(error)) from error
        if error.status == 422:
            raise InvalidObjectError(_status_message(error)) from error
        if error.status in (409, 429) or (error.status or 0) >= 500:
            raise TransientApiError(f"{error.status} {error.reason}") from error
        raise
    # Connection refused/reset, TLS, socket timeouts (OSError); urllib3's MaxRetryError,
    # ProtocolError and ReadTimeoutError (what the client raises while the apiserver restarts
    # or etcd is frozen) are not OSErrors.
    except (OSError, Urllib3Error) as error:
        raise TransientApiError(str(error)) from error


VERBS = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


def request_resource(url: str) -> str:
    """The resource a request URL addresses, with its subresource:
    ``/api/v1/namespaces/n/configmaps/x`` -> ``configmaps``,
    ``/apis/g/v1/namespaces/n/moedeployments/x/status`` -> ``moedeployments/status``."""
    parts = [part for part in urlsplit(url).path.split("/") if part]
    rest = parts[2:] if parts[:1] == ["api"] else parts[3:]
    if rest[:1] == ["namespaces"] and len(rest) > 2:
        rest = rest[2:]
    if not rest:
        return "-"
    return "/".join(rest[:1] + rest[2:3])


class CountingApiClient(client.ApiClient):
    """The API client, counting each request (``moeplace_kube_requests_total``): API calls
    per reconcile are what a thousand objects cost the API server."""

    def call_api(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        verb = VERBS.get(method.upper(), method.lower())
        metrics.KUBE_REQUESTS.labels(verb, request_resource(url)).inc()
        return super().call_api(method, url, *args, **kwargs)


class Kube:
    def __init__(self, api_client: client.ApiClient | None = None) -> None:
        self.api = api_client or CountingApiClient()
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self.extensions = client.ApiextensionsV1Api(self.api)

    def read_configmap(self, namespace: str, name: str) -> Body | None:
        try:
            found = _call(
                lambda: self.core.read_namespaced_config_map(
                    name, namespace, _request_timeout=REQUEST_TIMEOUT_S
                )
            )
        except MissingObjectError:
            return None
        result: Body = self.api.sanitize_for_serialization(found)  # type: ignore[no-untyped-call]
        return result

    def read_secret(self, namespace: str, name: str) -> dict[str, str] | None:
        """A Secret's data, decoded (None when missing). A refusal (403: the chart grants get
        only on the Secrets listed in rbac.secretReads) is ``SecretForbiddenError``;
        nothing of the API's answer is kept in it."""
        try:
            found = _call(
                lambda: self.core.read_namespaced_secret(
                    name, namespace, _request_timeout=REQUEST_TIMEOUT_S
                )
            )
        except MissingObjectError:
            return None
        except ForbiddenError:
            raise SecretForbiddenError(f"{namespace}/{name}") from None
        except ApiException as error:
            if error.status == 401:
                raise SecretForbiddenError(f"{namespace}/{name}") from None
            raise
        data = found.data or {}
        return {
            key: base64.b64decode(value).decode("utf-8", "replace") for key, value in data.items()
        }

    def write_configmap(self, body: Body) -> None:
        """One create (no resourceVersion) or one replace (with it): the object is either the
        old or the new one, never a mix; a concurrent writer gets a 409 (TransientApiError)."""
        meta = body["metadata"]
        typed = client.V1ConfigMap.from_dict(body)
        assert typed is not None
        if meta.get("resourceVersion"):
            _call(
                lambda: self.core.replace_namespaced_config_map(
                    meta["name"], meta["namespace"], typed, _request_timeout=REQUEST_TIMEOUT_S
                )
            )
        else:
            _call(
                lambda: self.core.create_namespaced_config_map(
                    meta["namespace"], typed, _request_timeout=REQUEST_TIMEOUT_S
                )
            )

    def annotate_node(self, name: str, annotations: dict[str, str]) -> None:
        """Merge-patch annotations onto a Node (needs ``patch`` on nodes)."""
        body = {"metadata": {"annotations": annotations}}
        _call(lambda: self.core.patch_node(name, body, _request_timeout=REQUEST_TIMEOUT_S))

    def read_crd(self, name: str) -> Body | None:
        try:
            found = _call(
                lambda: self.extensions.read_custom_resource_definition(
                    name, _request_timeout=REQUEST_TIMEOUT_S
                )
            )
        except MissingObjectError:
            return None
        result: Body = self.api.sanitize_for_serialization(found)  # type: ignore[no-untyped-call]
        return result

    def apply_crd(self, crd: Body, field_manager: str) -> None:
        """Server-side apply (needs ``patch`` on the CRD); ``force`` takes over the fields
        another manager (helm's create, a manual ``kubectl apply``) set."""
        _call(
            lambda: self.extensions.patch_custom_resource_definition(
                crd["metadata"]["name"],
                crd,
                field_manager=field_manager,
                force=True,
                _content_type="application/apply-patch+yaml",
                _request_timeout=REQUEST_TIMEOUT_S,
            )
        )

    def read_moedeployment(self, namespace: str, name: str) -> Body:
        found = _call(
            lambda: self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, _request_timeout=REQUEST_TIMEOUT_S
            )
        )
        return cast(Body, found)

    def patch_status(self, namespace: str, name: str, patch: Body) -> None:
        _call(
            lambda: self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, name, patch, _request_timeout=REQUEST_TIMEOUT_S
            )
        )

    def patch_target(self, namespace: str, kind: TargetKind, name: str, patch: Body) -> None:
        """Merge-patch an apps/v1 workload (the pod-template annotation that rolls it)."""
        _call(
            lambda: self.custom.patch_namespaced_custom_object(
                "apps",
                "v1",
                namespace,
                TEMPLATE_PATH[kind],
                name,
                patch,
                _request_timeout=REQUEST_TIMEOUT_S,
            )
        )

    def read_target_hash(self, namespace: str, kind: TargetKind, name: str) -> str | None:
        """The placement hash annotation on a workload's pod template (None when unset)."""
        found = cast(
            Body,
            _call(
                lambda: self.custom.get_namespaced_custom_object(
                    "apps",
                    "v1",
                    namespace,
                    TEMPLATE_PATH[kind],
                    name,
                    _request_timeout=REQUEST_TIMEOUT_S,
                )
            ),
        )
        template = found.get("spec", {}).get("template", {})
        annotations = template.get("metadata", {}).get("annotations") or {}
        value = annotations.get(f"{GROUP}/placement-hash")
        return str(value) if value is not None else None
