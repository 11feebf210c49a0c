#!/usr/bin/env bash
# Build the local cluster's Go parts (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, kwok, helm) at the versions pinned in tools/go.mod.
#
# Everything lives in a per-user cache keyed by the pins, so a fresh clone on the same machine
# reuses it and a second run takes seconds:
#   ${XDG_CACHE_HOME:-~/.cache}/moeplace/go/{mod,build}   Go module and build caches
#   ${XDG_CACHE_HOME:-~/.cache}/moeplace/bin/<key>/        the binaries, one folder per pin set
# Usage: tools/build.sh            build what is missing, print the bin folder on the last line
#        tools/build.sh --bindir   only print the bin folder (builds nothing)
set -euo pipefail
TOOLS_DIR="$(cd "$(dirname "$0")" && pwd)"
CACHE="${MOEPLACE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/moeplace}"
GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
if [[ ! -x "$GO" ]]; then
  echo "tools/build.sh: no Go toolchain (looked for 'go' on PATH and /usr/local/go/bin/go)" >&2
  exit 2
fi
export GOTOOLCHAIN=local GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build" CGO_ENABLED=0
export GOFLAGS="${GOFLAGS:-}"

modver() {
  awk -v m="$1" '{ for (i = 1; i < NF; i++) if ($i == m && $(i + 1) ~ /^v/) { print $(i + 1); exit } }' \
    "$TOOLS_DIR/go.mod"
}
K8S="$(modver k8s.io/kubernetes)"
HELM="$(modver helm.sh/helm/v3)"
KWOK="$(modver sigs.k8s.io/kwok)"
ETCD="$(modver go.etcd.io/etcd/server/v3)"
GOVER="$("$GO" env GOVERSION)"
KEY="k8s-${K8S}-$(cat "$TOOLS_DIR/go.mod" "$TOOLS_DIR/go.sum" "$TOOLS_DIR/etcd/main.go" \
  <(echo "$GOVER") | sha256sum | cut -c1-12)"
BIN="$CACHE/bin/$KEY"

if [[ "${1:-}" == "--bindir" ]]; then
  echo "$BIN"
  exit 0
fi

mkdir -p "$BIN" "$GOMODCACHE" "$GOCACHE"
cd "$TOOLS_DIR"
echo "tools/build.sh: $GOVER; kubernetes $K8S, etcd $ETCD, kwok $KWOK, helm $HELM -> $BIN"

# Preflight: a Go new enough for the pins, and every pinned module reachable, each failure named.
need="$(awk '$1 == "go" { print $2; exit }' go.mod)"
if [[ "$(printf '%s\n%s\n' "go$need" "$GOVER" | sort -V | head -1)" != "go$need" ]]; then
  echo "tools/build.sh: $GOVER is older than go $need, which tools/go.mod (k8s.io/kubernetes" \
    "$K8S) needs; GOTOOLCHAIN=local forbids downloading a toolchain: install Go >= $need" >&2
  exit 2
fi
if [[ ! -x "$BIN/kube-apiserver" || ! -x "$BIN/helm" || ! -x "$BIN/kwok" || ! -x "$BIN/etcd" ]]; then
  for mv in "k8s.io/kubernetes@$K8S" "go.etcd.io/etcd/server/v3@$ETCD" "sigs.k8s.io/kwok@$KWOK" \
    "helm.sh/helm/v3@$HELM"; do
    if ! err="$("$GO" mod download "$mv" 2>&1)"; then
      echo "tools/build.sh: cannot get $mv from the Go module proxy ($("$GO" env GOPROXY)): $err" >&2
      exit 2
    fi
  done
fi

# Version stamps: without them the binaries report v0.0.0, which breaks kubeVersion checks.
minor="${K8S#v1.}"
minor="${minor%%.*}"
kv=""
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  kv+=" -X $p.gitVersion=$K8S -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
done
declare -A PKG=(
  [etcd]="./etcd"
  [kube-apiserver]="k8s.io/kubernetes/cmd/kube-apiserver"
  [kube-controller-manager]="k8s.io/kubernetes/cmd/kube-controller-manager"
  [kube-scheduler]="k8s.io/kubernetes/cmd/kube-scheduler"
  [kubectl]="k8s.io/kubernetes/cmd/kubectl"
  [kwok]="sigs.k8s.io/kwok/cmd/kwok"
  [helm]="helm.sh/helm/v3/cmd/helm"
)
declare -A LDX=(
  [etcd]=""
  [kube-apiserver]="$kv"
  [kube-controller-manager]="$kv"
  [kube-scheduler]="$kv"
  [kubectl]="$kv"
  [kwok]="$kv -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK"
  [helm]="$kv -X helm.sh/helm/v3/internal/version.version=$HELM"
)
failed=()
for name in etcd kubectl kwok helm kube-controller-manager kube-scheduler kube-apiserver; do
  if [[ -x "$BIN/$name" ]]; then
    echo "  $name: cached"
    continue
  fi
  start=$(date +%s)
  if "$GO" build -trimpath -ldflags "-s -w ${LDX[$name]}" -o "$BIN/$name.tmp" "${PKG[$name]}"; then
    mv "$BIN/$name.tmp" "$BIN/$name"
    echo "  $name: built in $(($(date +%s) - start)) s"
  else
    rm -f "$BIN/$name.tmp"
    echo "  $name: BUILD FAILED (${PKG[$name]} from tools/go.mod; see the go output above)" >&2
    failed+=("$name")
  fi
done
# kwok's own stage files (node initialise + lease heartbeat, pod ready/complete/delete), from
# the pinned kwok module: `kwok` refuses to start without stages.
stages="$BIN/kwok-stages.yaml"
if [[ ! -s "$stages" ]]; then
  kdir="$("$GO" mod download -json "sigs.k8s.io/kwok@$KWOK" | sed -n 's/.*"Dir": "\(.*\)",*/\1/p')"
  for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
    pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    echo "---"
    cat "$kdir/kustomize/stage/$f"
  done >"$stages.tmp" && mv "$stages.tmp" "$stages" || {
    echo "  kwok-stages.yaml: FAILED (stage files of sigs.k8s.io/kwok@$KWOK not found)" >&2
    failed+=(kwok-stages.yaml)
  }
fi
if ((${#failed[@]})); then
  echo "tools/build.sh: could not build: ${failed[*]}" >&2
  exit 1
fi
echo "$BIN"
