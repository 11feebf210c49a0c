"""pytest fixtures for end-to-end tests against the real local cluster (see e2e/README.md).

`cluster` (session scope) brings the cluster up, or reuses one already running, and yields a
`Cluster`. If this session started it, the session brings it down at the end unless another
pytest session is still using it (set MOEPLACE_KEEP_CLUSTER=1 to leave it running); a cluster
that was already up is left as found.
Every test that uses it must be marked `e2e`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import localcluster as lc
import pytest


@dataclass
class Cluster:
    """Handle on the running local cluster, for tests."""

    state: Path
    bin_dir: Path
    kubeconfig: Path
    prometheus_url: str
    started_here: bool
    _node_selectors: list[str] = field(default_factory=list)

    # ---- binaries ---------------------------------------------------------------------------
    @property
    def kubectl_bin(self) -> Path:
        return self.bin_dir / "kubectl"

    @property
    def helm_bin(self) -> Path:
        return self.bin_dir / "helm"

    @property
    def env(self) -> dict[str, str]:
        """Environment for subprocesses that talk to the cluster (KUBECONFIG, PATH, ...)."""
        return {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "PROMETHEUS_URL": self.prometheus_url,
            "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run the project's kubectl against the cluster; raises on failure unless check=False."""
        proc = subprocess.run(
            [str(self.kubectl_bin), f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
            )
        return proc

    def helm(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """Run the project's helm against the cluster."""
        proc = subprocess.run(
            [str(self.helm_bin), f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"helm {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
            )
        return proc

    def api_client(self) -> Any:
        """A new kubernetes.client.ApiClient for the admin user (system:masters)."""
        from kubernetes import config

        return config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(self.kubeconfig)
        )

    # ---- Prometheus -------------------------------------------------------------------------
    def add_scrape_target(
        self, job: str, address: str | Sequence[str], labels: Mapping[str, str] | None = None
    ) -> Path:
        """Have Prometheus scrape `address` ("127.0.0.1:PORT", or a list) as job `job`.

        Picked up without a restart, usually within 5 s; scrape interval 1 s.
        """
        return lc.add_scrape_target(job, address, dict(labels or {}), state=self.state)

    def remove_scrape_target(self, job: str) -> None:
        lc.remove_scrape_target(job, state=self.state)

    def prom_query(self, expr: str) -> list[dict[str, Any]]:
        """Instant PromQL query; returns the `data.result` list."""
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.load(resp)
        if body.get("status") != "success":
            raise AssertionError(f"prometheus query {expr!r}: {body}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def wait_prom(self, expr: str, timeout: float = 60) -> list[dict[str, Any]]:
        """Poll a PromQL query until it returns a non-empty result (or fail after timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.prom_query(expr)
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"prometheus: no result for {expr!r} after {timeout} s")
            time.sleep(0.5)

    # ---- kwok GPU nodes ---------------------------------------------------------------------
    def make_nodes(
        self,
        count: int,
        gpus_per_node: int = 8,
        speeds: str | Sequence[Sequence[float]] = "",
        pool: str = "default",
        prefix: str = "gpu-node",
    ) -> list[str]:
        """Create (or update) kwok GPU Nodes `<prefix>-0..count-1`; returns their names.

        speeds: "" (all 1.0), "pal" / "pal:A".."pal:D", a file path (CSV gpu,node,speed or one
        speed per line), or a count x gpus_per_node matrix of floats.
        Nodes get capacity/allocatable nvidia.com/gpu=gpus_per_node, label
        gpu.moeplace.io/pool=<pool> and gpu.moeplace.io/speed-<i>=<speed> per GPU.
        """
        names = lc.make_nodes(count, gpus_per_node, speeds, pool, prefix, state=self.state)
        self._node_selectors.append(f"{lc.POOL_LABEL}={pool}")
        return names

    def delete_nodes(self, pool: str | None = None, selector: str | None = None) -> None:
        """Delete the nodes of a pool (or matching a label selector) in one request."""
        sel = selector or f"{lc.POOL_LABEL}={pool or 'default'}"
        lc.delete_nodes(sel, state=self.state)


_THIS_MODULE = sys.modules[__name__]


def pytest_collectstart(collector: pytest.Collector) -> None:
    """Let e2e test modules `from conftest import Cluster` in a whole-repo run.

    Every conftest.py outside a package is imported as the module `conftest`, the last one
    loaded (tests/*/conftest.py) winning; put ours back before an e2e module is imported.
    """
    if isinstance(collector, pytest.Module):
        sys.modules["conftest"] = _THIS_MODULE


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """The real local cluster: started (or reused) once per session."""
    state = lc.default_state()
    try:
        bins = lc.bin_dir()
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.fail(f"local cluster: cannot locate the tools' bin folder: {e}", pytrace=False)
    missing = lc.missing_parts(bins)
    if missing:
        pytest.fail(
            "local cluster: missing parts (run `make tools`):\n  " + "\n  ".join(missing),
            pytrace=False,
        )
    # Brought down at the end only when nothing of it ran before; a partly running cluster
    # (someone else's, one part crashed) is repaired by `up` and left running.
    started_here = not lc.any_running(state)
    if not lc.is_up(state):
        try:
            lc.up(state)
        except lc.ClusterError as e:
            pytest.fail(f"local cluster did not come up: {e}", pytrace=False)
    ports = lc.ports(lc.Paths(state))
    handle = Cluster(
        state=state,
        bin_dir=bins,
        kubeconfig=lc.Paths(state).kubeconfig,
        prometheus_url=f"http://127.0.0.1:{ports['prometheus']}",
        started_here=started_here,
    )
    me = lc.register_user(state)
    try:
        yield handle
    finally:
        # Another pytest session still using this cluster keeps it up (it is reused later).
        others = lc.other_users(me)
        me.unlink(missing_ok=True)
        keep = os.environ.get("MOEPLACE_KEEP_CLUSTER", "") in ("1", "true")
        if started_here and not keep and not others:
            lc.down(state)


T = TypeVar("T")


def wait_for(what: str, fn: Callable[[], T | None], timeout: float = 60, every: float = 0.2) -> T:
    """Poll ``fn`` until it returns something truthy; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)
