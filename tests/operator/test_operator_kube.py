"""kube._call: how API faults reach the reconciler."""

from __future__ import annotations

import json

import pytest
from kubernetes.client.exceptions import ApiException
from moeplace_operator.kube import ForbiddenError, MissingObjectError, TransientApiError, _call


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


def test_a_422_is_left_to_the_caller() -> None:
    with pytest.raises(ApiException):
        _call(lambda: raise_(failing(422, None)))
