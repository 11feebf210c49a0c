"""The real local cluster: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok
and Prometheus, started from the project's own binaries with state under `.cluster/`.

Standard library only, so `e2e/cluster` runs before the virtual environment exists. The pytest
fixture in `e2e/conftest.py` and the `e2e/cluster` command both drive this module.

Binaries: `tools/build.sh --bindir` names the folder of the Go-built parts (a per-user cache
keyed by the pins in `tools/go.mod`); Prometheus is Debian's `/usr/bin/prometheus`, run as our
own process with our own config, data folder and port (never Debian's systemd service).
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
PAL_CSV = SHARED / "data/gpu-variability/pal-v100-rtx5000-a100/32gpu-variability.csv"

GO_PARTS = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kwok",
    "helm",
)
PROMETHEUS_DEFAULT = "/usr/bin/prometheus"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
ALL_COMPONENTS = (*COMPONENTS, "prometheus")

GPU_RESOURCE = "nvidia.com/gpu"
POOL_LABEL = "gpu.moeplace.io/pool"
SPEED_LABEL_PREFIX = "gpu.moeplace.io/speed-"
KWOK_ANNOTATION = "kwok.x-k8s.io/node"
FIELD_MANAGER = "moeplace-e2e"


class ClusterError(RuntimeError):
    """A part of the local cluster is missing or did not come up; the message says which."""


def log(msg: str) -> None:
    print(f"[cluster] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Paths and binaries


@dataclass(frozen=True)
class Paths:
    """Everything the cluster keeps under its state folder (default: `<repo>/.cluster`)."""

    state: Path

    @property
    def pki(self) -> Path:
        return self.state / "pki"

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    @property
    def run(self) -> Path:
        return self.state / "run"

    @property
    def etcd_data(self) -> Path:
        return self.state / "etcd-data"

    @property
    def prometheus(self) -> Path:
        return self.state / "prometheus"

    @property
    def targets(self) -> Path:
        """file_sd folder: one `<job>.json` per scrape target, picked up without restart."""
        return self.prometheus / "targets"

    @property
    def kubeconfig(self) -> Path:
        return self.state / "kubeconfig"

    @property
    def ports_file(self) -> Path:
        return self.state / "ports.json"

    @property
    def lock_file(self) -> Path:
        return self.state / ".lock"


def default_state() -> Path:
    return Path(os.environ.get("MOEPLACE_CLUSTER_DIR", str(REPO / ".cluster"))).resolve()


def bin_dir() -> Path:
    """The folder of the Go-built parts for the pins in tools/go.mod (may not exist yet)."""
    env = os.environ.get("MOEPLACE_BIN_DIR")
    if env:
        return Path(env)
    out = subprocess.run(
        ["bash", str(REPO / "tools/build.sh"), "--bindir"],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip().splitlines()[-1])


def prometheus_bin() -> Path:
    return Path(os.environ.get("MOEPLACE_PROMETHEUS", PROMETHEUS_DEFAULT))


def missing_parts(bins: Path | None = None) -> list[str]:
    """Every binary the cluster needs that is not there, each with how to get it."""
    bins = bins or bin_dir()
    missing = [
        f"{name} (expected {bins / name}; build it with `make tools` or tools/build.sh)"
        for name in GO_PARTS
        if not os.access(bins / name, os.X_OK)
    ]
    if not (bins / "kwok-stages.yaml").is_file():
        missing.append(f"kwok-stages.yaml (expected {bins}; made by tools/build.sh)")
    prom = prometheus_bin()
    if not os.access(prom, os.X_OK):
        missing.append(
            f"prometheus (expected {prom}; install Debian's package: `make tools` "
            "or apt-get install -y prometheus)"
        )
    for tool in ("openssl",):
        if not any(os.access(Path(d) / tool, os.X_OK) for d in os.get_exec_path()):
            missing.append(f"{tool} (Debian package {tool})")
    return missing


# --------------------------------------------------------------------------------------------
# Processes: started in their own session, ended by the recorded PID only


def _proc_start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    if fields[0] == "Z":  # zombie: exited, not yet reaped
        return None
    return fields[19]  # field 22 of stat: start time in clock ticks since boot


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


_CHILDREN: list[subprocess.Popen[bytes]] = []  # keeps Popen objects alive (no ResourceWarning)


class Proc:
    """A recorded process: `<state>/run/<name>.json` holds its PID, start time and command."""

    def __init__(self, paths: Paths, name: str) -> None:
        self.paths = paths
        self.name = name
        self.record = paths.run / f"{name}.json"
        self.logfile = paths.logs / f"{name}.log"

    def pid(self) -> int | None:
        """The recorded PID if that very process (same start time) is still running."""
        try:
            rec = json.loads(self.record.read_text())
        except (OSError, ValueError):
            return None
        pid = int(rec["pid"])
        _reap(pid)
        if _proc_start_time(pid) != rec["start"]:
            return None
        return pid

    def alive(self) -> bool:
        return self.pid() is not None

    def start(self, argv: Sequence[str]) -> int:
        self.paths.run.mkdir(parents=True, exist_ok=True)
        self.paths.logs.mkdir(parents=True, exist_ok=True)
        with self.logfile.open("ab") as out:
            out.write(f"\n=== {time.strftime('%F %T')} {' '.join(argv)}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.paths.state,
            )
        _CHILDREN.append(proc)
        start = None
        for _ in range(100):
            start = _proc_start_time(proc.pid)
            if start is not None:
                break
            time.sleep(0.01)
        if start is None:
            raise ClusterError(f"{self.name} exited at once; see {self.logfile}")
        tmp = self.record.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": proc.pid, "start": start, "argv": list(argv)}))
        tmp.replace(self.record)
        return proc.pid

    def stop(self, timeout: float = 10.0) -> bool:
        """SIGTERM the recorded process (SIGKILL after `timeout`); True if one was running."""
        pid = self.pid()
        if pid is None:
            self.record.unlink(missing_ok=True)
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.pid() is not None:
            time.sleep(0.05)
        if self.pid() is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            while self.pid() is not None:
                time.sleep(0.05)
        self.record.unlink(missing_ok=True)
        return True

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


# --------------------------------------------------------------------------------------------
# Certificates (openssl) and kubeconfig


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def ensure_pki(paths: Paths) -> None:
    """CA, apiserver serving cert, admin client cert (system:masters), service-account keys."""
    pki = paths.pki
    if (pki / "admin.crt").exists() and (pki / "sa.pub").exists():
        return
    pki.mkdir(parents=True, exist_ok=True)
    pki.chmod(0o700)
    days = "3650"
    _openssl("genrsa", "-out", str(pki / "ca.key"), "2048")
    _openssl(
        "req", "-x509", "-new", "-nodes", "-key", str(pki / "ca.key"), "-sha256",
        "-days", days, "-subj", "/CN=moeplace-local-ca", "-out", str(pki / "ca.crt"),
    )  # fmt: skip
    ext = pki / "apiserver.ext"
    ext.write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,"
        "DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,"
        "DNS:kubernetes.default.svc.cluster.local\n"
    )
    client_ext = pki / "client.ext"
    client_ext.write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=clientAuth\n"
    )
    for name, subj, extfile in (
        ("apiserver", "/CN=kube-apiserver", ext),
        ("admin", "/O=system:masters/CN=moeplace-admin", client_ext),
    ):
        _openssl("genrsa", "-out", str(pki / f"{name}.key"), "2048")
        _openssl(
            "req", "-new", "-key", str(pki / f"{name}.key"), "-subj", subj,
            "-out", str(pki / f"{name}.csr"),
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", str(pki / f"{name}.csr"), "-CA", str(pki / "ca.crt"),
            "-CAkey", str(pki / "ca.key"), "-CAcreateserial", "-days", days, "-sha256",
            "-extfile", str(extfile), "-out", str(pki / f"{name}.crt"),
        )  # fmt: skip
    _openssl("genrsa", "-out", str(pki / "sa.key"), "2048")
    _openssl("rsa", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub"))


def write_kubeconfig(paths: Paths, server: str) -> None:
    pki = paths.pki
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "moeplace",
                "cluster": {"server": server, "certificate-authority": str(pki / "ca.crt")},
            }
        ],
        "users": [
            {
                "name": "moeplace-admin",
                "user": {
                    "client-certificate": str(pki / "admin.crt"),
                    "client-key": str(pki / "admin.key"),
                },
            }
        ],
        "contexts": [
            {"name": "moeplace", "context": {"cluster": "moeplace", "user": "moeplace-admin"}}
        ],
        "current-context": "moeplace",
    }
    tmp = paths.kubeconfig.with_suffix(".tmp")
    tmp.write_text(json.dumps(cfg, indent=2))  # JSON is YAML: kubectl and clients read it
    tmp.replace(paths.kubeconfig)


# --------------------------------------------------------------------------------------------
# Ports


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PORT_NAMES = (
    "etcd",
    "etcd_peer",
    "apiserver",
    "controller_manager",
    "scheduler",
    "kwok",
    "prometheus",
)


def ports(paths: Paths, allocate: bool = False) -> dict[str, int]:
    """Ports of this cluster: picked free at the first `up`, kept in ports.json after."""
    try:
        got: dict[str, int] = json.loads(paths.ports_file.read_text())
        if all(n in got for n in PORT_NAMES):
            return got
    except (OSError, ValueError):
        pass
    if not allocate:
        raise ClusterError(f"cluster not set up (no {paths.ports_file}); run `e2e/cluster up`")
    chosen: dict[str, int] = {}
    while len(chosen) < len(PORT_NAMES):
        p = _free_port()
        if p not in chosen.values():
            chosen[PORT_NAMES[len(chosen)]] = p
    paths.state.mkdir(parents=True, exist_ok=True)
    paths.ports_file.write_text(json.dumps(chosen, indent=2))
    return chosen


# --------------------------------------------------------------------------------------------
# HTTP to the API server (stdlib, client cert)


def ssl_context(paths: Paths) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(paths.pki / "ca.crt"))
    ctx.load_cert_chain(str(paths.pki / "admin.crt"), str(paths.pki / "admin.key"))
    return ctx


def _get(url: str, ctx: ssl.SSLContext | None = None, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=ctx) as resp:
            return int(resp.status), resp.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return int(e.code), e.read().decode(errors="replace")
    except (OSError, http.client.HTTPException) as e:
        return 0, str(e)


class Api:
    """Minimal keep-alive HTTPS client for the admin user (one connection per thread)."""

    def __init__(self, paths: Paths) -> None:
        self.port = ports(paths)["apiserver"]
        self.ctx = ssl_context(paths)

    def conn(self) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx, timeout=30)

    @staticmethod
    def call(
        conn: http.client.HTTPSConnection,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw) if raw else None
        except ValueError:
            return resp.status, raw.decode(errors="replace")


# --------------------------------------------------------------------------------------------
# Up / down / status


@contextlib.contextmanager
def _locked(paths: Paths) -> Iterator[None]:
    paths.state.mkdir(parents=True, exist_ok=True)
    with paths.lock_file.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _wait(what: str, check: Any, proc: Proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if not proc.alive():
            raise ClusterError(f"{what} exited while starting; log {proc.logfile}:\n"
                               f"{proc.log_tail()}")  # fmt: skip
        time.sleep(0.1)
    raise ClusterError(f"{what} not healthy after {timeout:.0f} s; log {proc.logfile}:\n"
                       f"{proc.log_tail()}")  # fmt: skip


def _healthy_http(url: str, ctx: ssl.SSLContext | None = None) -> bool:
    return _get(url, ctx)[0] == 200


def _insecure() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def prometheus_config(paths: Paths) -> str:
    """Our Prometheus config: 1 s scrapes of every target listed in targets/*.json."""
    return (
        "# Generated by e2e/localcluster.py; targets are files in targets/ (file_sd).\n"
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: file_sd\n"
        "    file_sd_configs:\n"
        f"      - files: ['{paths.targets}/*.json']\n"
        "        refresh_interval: 1s\n"
    )


def _argv(paths: Paths, bins: Path, p: dict[str, int]) -> dict[str, list[str]]:
    pki = paths.pki
    kc = str(paths.kubeconfig)
    return {
        "etcd": [
            str(bins / "etcd"),
            "--name=moeplace",
            f"--data-dir={paths.etcd_data}",
            f"--listen-client-urls=http://127.0.0.1:{p['etcd']}",
            f"--advertise-client-urls=http://127.0.0.1:{p['etcd']}",
            f"--listen-peer-urls=http://127.0.0.1:{p['etcd_peer']}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{p['etcd_peer']}",
            f"--initial-cluster=moeplace=http://127.0.0.1:{p['etcd_peer']}",
            "--unsafe-no-fsync=true",  # a throwaway test store: no fsync, much faster on 2 cores
            "--log-level=warn",
        ],
        "kube-apiserver": [
            str(bins / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{p['etcd']}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={p['apiserver']}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--authorization-mode=Node,RBAC",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--endpoint-reconciler-type=none",
            "--delete-collection-workers=4",
            "--profiling=false",
            "--v=1",
        ],
        "kube-controller-manager": [
            str(bins / "kube-controller-manager"),
            f"--kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            "--bind-address=127.0.0.1",
            f"--secure-port={p['controller_manager']}",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            "--use-service-account-credentials=true",
            "--leader-elect=false",
            "--profiling=false",
            "--v=1",
        ],
        "kube-scheduler": [
            str(bins / "kube-scheduler"),
            f"--kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            "--bind-address=127.0.0.1",
            f"--secure-port={p['scheduler']}",
            "--leader-elect=false",
            "--profiling=false",
            "--v=1",
        ],
        "kwok": [
            str(bins / "kwok"),
            f"--kubeconfig={kc}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fake",
            f"--config={bins / 'kwok-stages.yaml'}",
            "--node-lease-duration-seconds=40",
            f"--server-address=127.0.0.1:{p['kwok']}",
            "--cidr=10.0.0.1/24",
            "--node-ip=127.0.0.1",
        ],
        "prometheus": [
            str(prometheus_bin()),
            f"--config.file={paths.prometheus / 'prometheus.yml'}",
            f"--storage.tsdb.path={paths.prometheus / 'data'}",
            f"--web.listen-address=127.0.0.1:{p['prometheus']}",
            "--web.enable-lifecycle",
            "--storage.tsdb.retention.time=1d",
            "--log.level=warn",
        ],
    }


def _health_checks(paths: Paths, p: dict[str, int]) -> dict[str, Any]:
    api_ctx = ssl_context(paths) if (paths.pki / "admin.crt").exists() else None
    insecure = _insecure()
    return {
        "etcd": lambda: _healthy_http(f"http://127.0.0.1:{p['etcd']}/health"),
        "kube-apiserver": lambda: _healthy_http(
            f"https://127.0.0.1:{p['apiserver']}/readyz", api_ctx
        ),
        "kube-controller-manager": lambda: _healthy_http(
            f"https://127.0.0.1:{p['controller_manager']}/healthz", insecure
        ),
        "kube-scheduler": lambda: _healthy_http(
            f"https://127.0.0.1:{p['scheduler']}/healthz", insecure
        ),
        "kwok": lambda: _healthy_http(f"http://127.0.0.1:{p['kwok']}/healthz"),
        "prometheus": lambda: _healthy_http(f"http://127.0.0.1:{p['prometheus']}/-/ready"),
    }


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def any_running(state: Path | None = None) -> bool:
    """True when any recorded process of this cluster still runs."""
    paths = Paths(state or default_state())
    return any(Proc(paths, c).alive() for c in ALL_COMPONENTS)


def is_up(state: Path | None = None) -> bool:
    """True when every component runs (by recorded PID) and answers its health check."""
    paths = Paths(state or default_state())
    try:
        p = ports(paths)
    except ClusterError:
        return False
    checks = _health_checks(paths, p)
    return all(Proc(paths, c).alive() and checks[c]() for c in ALL_COMPONENTS)


def up(state: Path | None = None) -> float:
    """Start whatever is not running (idempotent); returns the seconds it took."""
    t0 = time.monotonic()
    paths = Paths(state or default_state())
    bins = bin_dir()
    missing = missing_parts(bins)
    if missing:
        raise ClusterError("missing parts of the local cluster:\n  " + "\n  ".join(missing))
    with _locked(paths):
        # Nothing of ours runs but another program took one of our ports meanwhile (after a
        # reboot, say): start afresh on new ports rather than fail on a busy one.
        if (
            not any_running(paths.state)
            and paths.ports_file.exists()
            and any(not _port_free(port) for port in ports(paths).values())
        ):
            log("a recorded port is busy and nothing runs: new ports, fresh etcd data")
            shutil.rmtree(paths.etcd_data, ignore_errors=True)
            paths.ports_file.unlink()
        p = ports(paths, allocate=True)
        ensure_pki(paths)
        write_kubeconfig(paths, f"https://127.0.0.1:{p['apiserver']}")
        paths.targets.mkdir(parents=True, exist_ok=True)
        (paths.prometheus / "prometheus.yml").write_text(prometheus_config(paths))
        argv = _argv(paths, bins, p)
        checks = _health_checks(paths, p)
        # Prometheus needs nothing of the rest: start it first, check it last.
        order = ("prometheus", *COMPONENTS)
        started: list[str] = []
        for name in order:
            proc = Proc(paths, name)
            if proc.alive():
                continue
            if name == "kube-apiserver":
                _wait("etcd", checks["etcd"], Proc(paths, "etcd"), 30)
            if name == "kube-controller-manager":
                api = Proc(paths, "kube-apiserver")
                _wait("kube-apiserver", checks["kube-apiserver"], api, 60)
            proc.start(argv[name])
            started.append(name)
        for name in ALL_COMPONENTS:
            _wait(name, checks[name], Proc(paths, name), 60)
    took = time.monotonic() - t0
    log(f"up in {took:.1f} s (started: {', '.join(started) or 'nothing, all running'})")
    return took


def down(state: Path | None = None, keep_data: bool = False) -> None:
    """Stop every recorded process (by PID) and, unless keep_data, wipe etcd/Prometheus data."""
    paths = Paths(state or default_state())
    if not paths.state.exists():
        return
    with _locked(paths):
        for name in reversed(("prometheus", *COMPONENTS)):
            if Proc(paths, name).stop():
                log(f"stopped {name}")
        if not keep_data:
            for d in (paths.etcd_data, paths.prometheus / "data", paths.targets):
                shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Faults: one component restarted or frozen (the fault tests)


def restart(component: str, state: Path | None = None, down_s: float = 0.0) -> float:
    """Stop one component by its recorded PID (SIGTERM, SIGKILL after 10 s), leave it down
    ``down_s`` seconds, start it again (``up``: what is missing) and wait until everything
    answers; returns the seconds from the stop until healthy again."""
    if component not in ALL_COMPONENTS:
        raise ClusterError(f"no component {component!r}; one of {', '.join(ALL_COMPONENTS)}")
    paths = Paths(state or default_state())
    t0 = time.monotonic()
    if not Proc(paths, component).stop():
        raise ClusterError(f"{component} was not running")
    time.sleep(down_s)
    up(paths.state)
    return time.monotonic() - t0


@contextlib.contextmanager
def paused(component: str, state: Path | None = None) -> Iterator[int]:
    """SIGSTOP one component for the ``with`` block (a frozen etcd: connections stay open,
    nothing answers), SIGCONT after, whatever happens inside; yields its PID."""
    pid = Proc(Paths(state or default_state()), component).pid()
    if pid is None:
        raise ClusterError(f"{component} is not running")
    os.kill(pid, signal.SIGSTOP)
    try:
        yield pid
    finally:
        os.kill(pid, signal.SIGCONT)


def status(state: Path | None = None) -> dict[str, Any]:
    paths = Paths(state or default_state())
    out: dict[str, Any] = {"state": str(paths.state), "components": {}}
    try:
        p = ports(paths)
    except ClusterError:
        out["up"] = False
        return out
    checks = _health_checks(paths, p)
    for c in ALL_COMPONENTS:
        pid = Proc(paths, c).pid()
        out["components"][c] = {
            "pid": pid,
            "healthy": bool(pid and checks[c]()),
            "log": str(Proc(paths, c).logfile),
        }
    out["up"] = all(v["healthy"] for v in out["components"].values())
    out["ports"] = p
    out["kubeconfig"] = str(paths.kubeconfig)
    out["prometheus_url"] = f"http://127.0.0.1:{p['prometheus']}"
    if out["components"]["kube-apiserver"]["healthy"]:
        api = Api(paths)
        code, body = Api.call(api.conn(), "GET", "/api/v1/nodes?limit=1")
        if code == 200:
            rest = body["metadata"].get("remainingItemCount", 0) or 0
            out["nodes"] = len(body["items"]) + int(rest)
    return out


def register_user(state: Path | None = None) -> Path:
    """Record this process as a user of the cluster (pytest sessions share one cluster)."""
    paths = Paths(state or default_state())
    users = paths.state / "users"
    users.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    f = users / f"{pid}-{_proc_start_time(pid)}"
    f.touch()
    return f


def other_users(mine: Path) -> int:
    """How many other recorded users still run (stale records are removed)."""
    alive = 0
    for f in mine.parent.iterdir():
        if f == mine:
            continue
        pid, _, start = f.name.partition("-")
        if pid.isdigit() and _proc_start_time(int(pid)) == start:
            alive += 1
        else:
            f.unlink(missing_ok=True)
    return alive


def env_lines(state: Path | None = None) -> list[str]:
    paths = Paths(state or default_state())
    p = ports(paths)
    bins = bin_dir()
    return [
        f"export KUBECONFIG={paths.kubeconfig}",
        f"export MOEPLACE_BIN_DIR={bins}",
        f"export PROMETHEUS_URL=http://127.0.0.1:{p['prometheus']}",
        f'export PATH="{bins}:$PATH"',
    ]


# --------------------------------------------------------------------------------------------
# Scrape targets (file_sd: a JSON file per job, written atomically; no restart)


def _job_file(paths: Paths, job: str) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in job)
    return paths.targets / f"{safe}.json"


def add_scrape_target(
    job: str,
    address: str | Sequence[str],
    labels: dict[str, str] | None = None,
    state: Path | None = None,
) -> Path:
    """Scrape `address` (host:port, or several) as job `job` from now on (within ~5 s)."""
    paths = Paths(state or default_state())
    paths.targets.mkdir(parents=True, exist_ok=True)
    addrs = [address] if isinstance(address, str) else list(address)
    entry = [{"targets": addrs, "labels": {**(labels or {}), "job": job}}]
    f = _job_file(paths, job)
    tmp = f.with_name(f".{f.name}.tmp")
    tmp.write_text(json.dumps(entry))
    tmp.replace(f)
    return f


def remove_scrape_target(job: str, state: Path | None = None) -> None:
    _job_file(Paths(state or default_state()), job).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# kwok GPU nodes


def format_speed(v: float) -> str:
    """Label value for a relative speed: a decimal string, 1.0 nominal."""
    s = f"{v:.4f}".rstrip("0")
    return s + "0" if s.endswith(".") else s


def pal_speeds(perf_class: str = "A") -> list[float]:
    """PAL (V100/RTX5000/A100) per-GPU speeds in GPU_ID order: speed = 1 / PerfVar_class<X>."""
    col = f"PerfVar_class{perf_class.upper()}"
    with PAL_CSV.open(newline="") as fh:
        rows = sorted(csv.DictReader(fh), key=lambda r: int(r["GPU_ID"]))
    return [1.0 / float(r[col]) for r in rows]


def load_speeds(spec: str, count: int, gpus_per_node: int) -> list[list[float]]:
    """Speeds for `count` nodes x `gpus_per_node` GPUs from a spec:

    - "" or "1": every GPU 1.0;
    - "pal" or "pal:A".."pal:D": the PAL measurements, 1/PerfVar (class A by default), assigned
      row-major (node 0 GPU 0, node 0 GPU 1, ...) and repeated when there are more GPUs;
    - a file path: a CSV with header `gpu,node,speed` (gpu = index in the node, node = node
      index or name; GPUs not listed get 1.0), or one speed per line, assigned row-major and
      repeated like PAL.
    """
    total = count * gpus_per_node
    grid = [[1.0] * gpus_per_node for _ in range(count)]
    if spec in ("", "1", "1.0", "nominal"):
        return grid
    flat: list[float]
    if spec.lower().startswith("pal"):
        flat = pal_speeds(spec.split(":", 1)[1] if ":" in spec else "A")
    else:
        text = Path(spec).read_text()
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
        if lines and lines[0].replace(" ", "").lower().startswith("gpu,node,speed"):
            for row in csv.DictReader(lines):
                node_key = row["node"].strip()
                node = (
                    int(node_key.rsplit("-", 1)[-1]) if not node_key.isdigit() else int(node_key)
                )  # "gpu-node-3" or "3"
                gpu = int(row["gpu"])
                if node < count and gpu < gpus_per_node:
                    grid[node][gpu] = float(row["speed"])
            return grid
        flat = [float(ln.split(",")[-1]) for ln in lines]
    if not flat:
        raise ClusterError(f"no speeds in {spec!r}")
    for i in range(total):
        grid[i // gpus_per_node][i % gpus_per_node] = flat[i % len(flat)]
    return grid


def node_manifest(name: str, pool: str, speeds: Sequence[float]) -> dict[str, Any]:
    gpus = str(len(speeds))
    labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "type": "kwok",
        POOL_LABEL: pool,
        **{f"{SPEED_LABEL_PREFIX}{i}": format_speed(s) for i, s in enumerate(speeds)},
    }
    resources = {"cpu": "64", "memory": "512Gi", "pods": "110", GPU_RESOURCE: gpus}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": {KWOK_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {},
        "status": {"capacity": resources, "allocatable": resources},
    }


def make_nodes(
    count: int,
    gpus_per_node: int,
    speeds: str | Sequence[Sequence[float]] = "",
    pool: str = "default",
    prefix: str = "gpu-node",
    state: Path | None = None,
    workers: int = 8,
) -> list[str]:
    """Create (or update, idempotently) `count` kwok GPU Nodes named `<prefix>-<i>`."""
    paths = Paths(state or default_state())
    grid = (
        load_speeds(speeds, count, gpus_per_node)
        if isinstance(speeds, str)
        else [list(map(float, row)) for row in speeds]
    )
    if len(grid) != count or any(len(row) != gpus_per_node for row in grid):
        raise ClusterError(f"speeds must be {count} rows of {gpus_per_node}")
    names = [f"{prefix}-{i}" for i in range(count)]
    manifests = [node_manifest(n, pool, grid[i]) for i, n in enumerate(names)]
    api = Api(paths)
    chunks = [manifests[i::workers] for i in range(workers)]

    def run(chunk: list[dict[str, Any]]) -> list[str]:
        errors: list[str] = []
        conn = api.conn()
        try:
            for m in chunk:
                code, body = Api.call(conn, "POST", "/api/v1/nodes", m)
                if code == 409:  # exists: server-side apply spec/labels and the GPU status
                    q = f"?fieldManager={FIELD_MANAGER}&force=true"
                    name = m["metadata"]["name"]
                    path = f"/api/v1/nodes/{name}"
                    ct = "application/apply-patch+yaml"
                    code, body = Api.call(conn, "PATCH", path + q, m, ct)
                    if code < 300:
                        code, body = Api.call(conn, "PATCH", path + "/status" + q, m, ct)
                if code >= 300:
                    errors.append(f"{m['metadata']['name']}: HTTP {code}: {body}")
        finally:
            conn.close()
        return errors

    with ThreadPoolExecutor(max_workers=workers) as ex:
        errors = [e for errs in ex.map(run, chunks) for e in errs]
    if errors:
        raise ClusterError(f"{len(errors)} nodes failed, first: {errors[0]}")
    return names


def delete_nodes(selector: str, state: Path | None = None, workers: int = 8) -> int:
    """Delete every Node matching a label selector (parallel DELETEs); returns how many."""
    api = Api(Paths(state or default_state()))
    q = urllib.parse.urlencode({"labelSelector": selector})
    conn = api.conn()
    code, body = Api.call(conn, "GET", f"/api/v1/nodes?{q}")
    conn.close()
    if code != 200:
        raise ClusterError(f"list nodes {selector!r}: HTTP {code}: {body}")
    names = [item["metadata"]["name"] for item in body["items"]]

    def run(chunk: list[str]) -> list[str]:
        errors: list[str] = []
        conn = api.conn()
        try:
            for name in chunk:
                code, body = Api.call(conn, "DELETE", f"/api/v1/nodes/{name}")
                if code >= 300 and code != 404:
                    errors.append(f"{name}: HTTP {code}: {body}")
        finally:
            conn.close()
        return errors

    with ThreadPoolExecutor(max_workers=workers) as ex:
        errors = [
            e for errs in ex.map(run, [names[i::workers] for i in range(workers)]) for e in errs
        ]
    if errors:
        raise ClusterError(f"{len(errors)} node deletes failed, first: {errors[0]}")
    return len(names)
