#!/usr/bin/env bash
# Builds the cluster box's binaries from Go modules at the versions pinned in the go.mod files
# beside this script, once per machine, into a cache outside the repository:
#   ${KAIFLOW_CACHE:-~/.cache/kaiflow}/cluster-tools/<key>/bin     the binaries
#   ${KAIFLOW_CACHE:-~/.cache/kaiflow}/cluster-tools/<key>/share   upstream manifests, from the
#       same modules: Argo's CRDs (manifests/base/crds/full), kwok's default stages, Karpenter's
#       NodeClaim/NodePool CRDs (sigs.k8s.io/karpenter, pkg/apis/crds)
# where <key> hashes the go.mod/go.sum/tools.go files, RECIPE below and `go version`. A changed pin
# builds a new folder; an unchanged one is reused (the script prints the folder and exits at once).
# Prints the folder on its last line; the wall time and size of a build go to stderr.
#
# Three modules, because their dependencies disagree:
#   kubernetes/  kube-apiserver, kube-controller-manager, kube-scheduler (k8s.io/kubernetes v1.33.13,
#                its staging modules replaced by k8s.io/* v0.33.13) and etcd (the version Kubernetes
#                itself requires)
#   kwok/        kwok v0.8.0 (k8s.io/* v0.36.1)
#   argo/        Argo Workflows v3.7.9: workflow-controller and the argo CLI (k8s.io/* v0.33.1).
#                Not argoexec: its module zip lacks the Linux Setpgid of workflow/executor/osspecific
#                ("undefined: Setpgid"), and it needs a container's /var/run/argo anyway
#                (docs/testing.md).
# Other Argo versions (argo-v3.6/: v3.6.18) are built by build-argo.sh, which reuses this script's
# Kubernetes, etcd and kwok binaries.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache_root="${KAIFLOW_CACHE:-$HOME/.cache/kaiflow}/cluster-tools"
# Bump when the way of building changes (flags, what is copied) so every machine rebuilds.
RECIPE=1
KARPENTER_VERSION=v1.14.3
# The three modules by name (the same files, in the same order, as the */ glob this used to be): the
# other Argo versions' modules beside them (argo-v3.6/, built by build-argo.sh) have keys of their own.
key="$( { cat "$here"/{argo,kubernetes,kwok}/go.mod "$here"/{argo,kubernetes,kwok}/go.sum "$here"/{argo,kubernetes,kwok}/tools.go; echo "$RECIPE $KARPENTER_VERSION"; go version; } | sha256sum | cut -c1-16)"
out="$cache_root/$key"
tools=(kube-apiserver kube-controller-manager kube-scheduler etcd kwok workflow-controller argo)

# One build at a time per machine (two pytest runs, or make and a test, may ask together).
mkdir -p "$cache_root"
exec 9>"$cache_root/.lock"
flock 9

complete() {
  for t in "${tools[@]}"; do [ -x "$out/bin/$t" ] || return 1; done
  [ -f "$out/share/.complete" ]
}
if complete; then echo "$out/bin"; exit 0; fi

mkdir -p "$out/bin"
start=$(date +%s)
export CGO_ENABLED=0 GOFLAGS=-mod=mod
log() { printf '[cluster-tools %4ss] %s\n' "$(( $(date +%s) - start ))" "$*" >&2; }

# From the go.mod's require block (`go mod tidy` writes one); an empty version would stamp binaries
# that panic at start ("version string \"\" doesn't match expected regular expression").
k8s_version="$(sed -n 's#^\(require \|[[:space:]]\+\)k8s.io/kubernetes \(v[^ ]*\)$#\2#p' "$here/kubernetes/go.mod")"
[ -n "$k8s_version" ] || { echo "$here/kubernetes/go.mod: no k8s.io/kubernetes requirement" >&2; exit 1; }
k8s_minor="$(echo "$k8s_version" | cut -d. -f2)"
k8s_ldflags="-s -w"
for kv in "gitVersion=$k8s_version" "gitMajor=1" "gitMinor=$k8s_minor" "gitTreeState=clean" "gitCommit=kaiflow-cluster-box"; do
  k8s_ldflags+=" -X k8s.io/component-base/version.${kv}"
done
build_k8s() {
  (cd "$here/kubernetes" && go build -trimpath -tags=selinux,notest -ldflags "$k8s_ldflags" -o "$out/bin/$1" "$2")
}
for pair in kube-apiserver:k8s.io/kubernetes/cmd/kube-apiserver \
            kube-controller-manager:k8s.io/kubernetes/cmd/kube-controller-manager \
            kube-scheduler:k8s.io/kubernetes/cmd/kube-scheduler \
            etcd:go.etcd.io/etcd/server/v3; do
  name="${pair%%:*}"
  [ -x "$out/bin/$name" ] && continue
  log "building $name"
  build_k8s "$name" "${pair#*:}"
done

if [ ! -x "$out/bin/kwok" ]; then
  log "building kwok"
  (cd "$here/kwok" && go build -trimpath -ldflags "-s -w" -o "$out/bin/kwok" sigs.k8s.io/kwok/cmd/kwok)
fi

argo_version="$(sed -n 's#^\(require \|[[:space:]]\+\)github.com/argoproj/argo-workflows/v3 \(v[^ ]*\)$#\2#p' "$here/argo/go.mod")"
argo_ldflags="-s -w -X github.com/argoproj/argo-workflows/v3.version=$argo_version"
for name in workflow-controller; do
  [ -x "$out/bin/$name" ] && continue
  log "building $name"
  (cd "$here/argo" && go build -trimpath -ldflags "$argo_ldflags" -o "$out/bin/$name" "github.com/argoproj/argo-workflows/v3/cmd/$name")
done

if [ ! -x "$out/bin/argo" ]; then
  # The CLI imports the UI package, which embeds ui/dist/app: absent from the module zip (Argo's
  # own Makefile writes a placeholder the same way). Build from a writable copy of the module.
  log "building argo (CLI)"
  src="$(cd "$here/argo" && go list -m -f '{{.Dir}}' github.com/argoproj/argo-workflows/v3)"
  tree="$out/argo-src"
  rm -rf "$tree" && cp -r "$src" "$tree" && chmod -R u+w "$tree"
  mkdir -p "$tree/ui/dist/app" && echo "Built without the UI" > "$tree/ui/dist/app/index.html"
  (cd "$tree" && go build -trimpath -ldflags "$argo_ldflags" -o "$out/bin/argo" ./cmd/argo)
  rm -rf "$tree"
fi

if [ ! -f "$out/share/.complete" ]; then
  log "copying upstream manifests"
  rm -rf "$out/share" && mkdir -p "$out/share/argo-crds" "$out/share/kwok-stages" "$out/share/karpenter-crds"
  argo_dir="$(cd "$here/argo" && go list -m -f '{{.Dir}}' github.com/argoproj/argo-workflows/v3)"
  cp "$argo_dir"/manifests/base/crds/full/argoproj.io_*.yaml "$out/share/argo-crds/"
  kwok_dir="$(cd "$here/kwok" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)"
  cp "$kwok_dir"/kustomize/stage/node/fast/node-initialize.yaml \
     "$kwok_dir"/kustomize/stage/node/heartbeat/node-heartbeat.yaml \
     "$kwok_dir"/kustomize/stage/pod/fast/pod-ready.yaml \
     "$kwok_dir"/kustomize/stage/pod/fast/pod-complete.yaml \
     "$kwok_dir"/kustomize/stage/pod/fast/pod-delete.yaml "$out/share/kwok-stages/"
  # Only the module's zip is wanted (its go.mod asks for a newer Go than this machine's, which
  # `go mod download` reports as an error after downloading): read the two CRDs from it.
  karpenter_zip="$( { go mod download -json "sigs.k8s.io/karpenter@$KARPENTER_VERSION" || true; } | sed -n 's/^\t"Zip": "\(.*\)",$/\1/p')"
  [ -f "$karpenter_zip" ] || { echo "sigs.k8s.io/karpenter@$KARPENTER_VERSION: no module zip" >&2; exit 1; }
  python3 - "$karpenter_zip" "$out/share/karpenter-crds" "sigs.k8s.io/karpenter@$KARPENTER_VERSION" <<'PY'
import sys, zipfile, pathlib
archive, dest, prefix = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
with zipfile.ZipFile(archive) as z:
    for kind in ("nodeclaims", "nodepools"):
        (dest / f"karpenter.sh_{kind}.yaml").write_bytes(z.read(f"{prefix}/pkg/apis/crds/karpenter.sh_{kind}.yaml"))
PY
  chmod -R u+w "$out/share"
  touch "$out/share/.complete"
fi

# Builds for older pins are of no further use: keep only this one.
for old in "$cache_root"/*/; do
  [ "${old%/}" = "$out" ] || rm -rf "$old"
done

log "built in $(( $(date +%s) - start )) s; binaries $(du -sh "$out/bin" | cut -f1); \
Go module cache $(du -sh "$(go env GOMODCACHE)" 2>/dev/null | cut -f1), build cache $(du -sh "$(go env GOCACHE)" 2>/dev/null | cut -f1)"
echo "$out/bin"
