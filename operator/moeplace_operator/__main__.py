"""``python -m moeplace_operator``: run the operator with our settings, ``/metrics`` and a
liveness endpoint. Single replica (the Helm chart uses strategy Recreate), no peering."""

from __future__ import annotations

import logging

import kopf
from prometheus_client import start_http_server

from moeplace_operator.config import OperatorConfig


def main() -> None:
    config = OperatorConfig.from_env()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if config.metrics_port:
        start_http_server(config.metrics_port)
    kopf.configure(verbose=False)
    kopf.run(
        registry=kopf.get_default_registry(),
        standalone=True,
        clusterwide=not config.namespaces,
        namespaces=config.namespaces,
        liveness_endpoint=config.liveness_endpoint or None,
    )


if __name__ == "__main__":
    main()
