"""``python -m moeplace_operator``: run the operator with our settings, ``/metrics`` and a
liveness endpoint. Any number of replicas: with ``MOEPLACE_LEADER_ELECTION_LEASE`` only the
holder of that Lease reconciles (``leader``)."""

from __future__ import annotations

import kopf
from prometheus_client import start_http_server

import moeplace_operator.handlers  # noqa: F401  (registers the handlers with kopf)
from moeplace_operator import faultpoints
from moeplace_operator.config import OperatorConfig


def main() -> None:
    config = OperatorConfig.from_env()
    faultpoints.configured()  # an unknown crash point fails here, not silently never
    if config.metrics_port:
        start_http_server(config.metrics_port)
    kopf.configure(verbose=False)  # kopf's own log format, INFO
    kopf.run(
        registry=kopf.get_default_registry(),
        standalone=True,
        clusterwide=not config.namespaces,
        namespaces=config.namespaces,
        liveness_endpoint=config.liveness_endpoint or None,
    )


if __name__ == "__main__":
    main()
