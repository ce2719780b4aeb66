#!/usr/bin/env bash
# Builds the cluster box with another Argo Workflows version than build.sh's v3.7.9:
#   bash tools/cluster/build-argo.sh v3.6     (what tests/fixtures/cluster.py runs for KAIFLOW_ARGO=v3.6)
# builds Argo's workflow-controller and argo CLI at the version pinned in tools/cluster/argo-<minor>/
# (a Go module of its own: v3.6.18 there) and assembles a box folder beside them, in a cache
# outside the repository:
#   ${KAIFLOW_CACHE:-~/.cache/kaiflow}/cluster-tools-argo/<minor>-<key>/argo/{bin,share}
#       that version's workflow-controller and argo, and its own CRDs (manifests/base/crds/minimal,
#       what its install.yaml applies: see below)
#   ${KAIFLOW_CACHE:-~/.cache/kaiflow}/cluster-tools-argo/<minor>-<key>/box-<build.sh's key>/{bin,share}
#       what the fixture starts: links to build.sh's Kubernetes, etcd and kwok binaries, this
#       version's Argo binaries; its CRDs, build.sh's kwok stages and Karpenter CRDs (copies), and
#       share/argo-version (the executor image tag the workflow-controller is given)
# where <key> hashes argo-<minor>/go.mod, go.sum, tools.go, RECIPE below and `go version`.
# Calls build.sh first (its binaries are reused, not rebuilt). Prints the box's bin folder on its
# last line; the wall time and size of a build go to stderr.
#
# Not under build.sh's cache folder (cluster-tools/), which keeps only build.sh's newest build, and
# build.sh hashes only its own three modules (argo, kubernetes, kwok), so this module's pins never
# rebuild Kubernetes.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
minor="${1:?usage: build-argo.sh <minor>, e.g. v3.6 (a folder tools/cluster/argo-<minor>/)}"
module="$here/argo-$minor"
[ -f "$module/go.mod" ] || { echo "no Go module $module (Argo versions built here: $(cd "$here" && ls -d argo-v* 2>/dev/null | tr '\n' ' '))" >&2; exit 2; }
cache_root="${KAIFLOW_CACHE:-$HOME/.cache/kaiflow}/cluster-tools-argo"
# Bump when the way of building changes (flags, what is copied) so every machine rebuilds.
RECIPE=1

box_bin="$(bash "$here/build.sh" | tail -n 1)"
box_dir="$(dirname "$box_bin")"

key="$( { cat "$module/go.mod" "$module/go.sum" "$module/tools.go"; echo "$RECIPE"; go version; } | sha256sum | cut -c1-16)"
out="$cache_root/$minor-$key"
view="$out/box-$(basename "$box_dir")"

mkdir -p "$cache_root"
exec 9>"$cache_root/.lock"
flock 9

if [ -f "$view/.complete" ]; then echo "$view/bin"; exit 0; fi

start=$(date +%s)
export CGO_ENABLED=0 GOFLAGS=-mod=mod
log() { printf '[cluster-tools-argo %4ss] %s\n' "$(( $(date +%s) - start ))" "$*" >&2; }

argo_version="$(sed -n 's#^\(require \|[[:space:]]\+\)github.com/argoproj/argo-workflows/v3 \(v[^ ]*\)$#\2#p' "$module/go.mod")"
[ -n "$argo_version" ] || { echo "$module/go.mod: no 'require github.com/argoproj/argo-workflows/v3 vX.Y.Z' line" >&2; exit 1; }
argo_ldflags="-s -w -X github.com/argoproj/argo-workflows/v3.version=$argo_version"
mkdir -p "$out/argo/bin"
for name in workflow-controller argo; do
  [ -x "$out/argo/bin/$name" ] && continue
  log "building $name $argo_version"
  (cd "$module" && nice -n 10 go build -trimpath -ldflags "$argo_ldflags" -o "$out/argo/bin/$name.tmp" \
     "github.com/argoproj/argo-workflows/v3/cmd/$name")
  mv "$out/argo/bin/$name.tmp" "$out/argo/bin/$name"
  log "built $name; binaries $(du -sh "$out/argo/bin" | cut -f1)"
done
if [ ! -f "$out/argo/share/.complete" ]; then
  # The minimal CRDs, which Argo's own install.yaml applies (v3.6 and v3.7 alike), not full/:
  # v3.6's full CRDs are refused by Kubernetes 1.33's API server ("dag.tasks.items.properties[inline]
  # .type: Required value", "steps.items.items: Required value") and its README calls them "probably
  # not suitable to be used in your cluster". Argo v3.7 fixed them; build.sh's v3.7.9 box applies
  # full/, the stricter check of the rendered fields (the v3.6 CLI's `argo lint --offline` refuses
  # unknown fields too).
  argo_dir="$(cd "$module" && go list -m -f '{{.Dir}}' github.com/argoproj/argo-workflows/v3)"
  rm -rf "$out/argo/share" && mkdir -p "$out/argo/share/argo-crds"
  cp "$argo_dir"/manifests/base/crds/minimal/argoproj.io_*.yaml "$out/argo/share/argo-crds/"
  chmod -R u+w "$out/argo/share"
  echo "$argo_version" > "$out/argo/share/argo-version"
  touch "$out/argo/share/.complete"
fi

# The box's folder for this pair (build.sh's key, this key): built aside, then moved into place.
tmp="$out/.view-$$"
rm -rf "$tmp" && mkdir -p "$tmp/bin" "$tmp/share"
for t in kube-apiserver kube-controller-manager kube-scheduler etcd kwok; do ln -s "$box_bin/$t" "$tmp/bin/$t"; done
for t in workflow-controller argo; do ln -s "$out/argo/bin/$t" "$tmp/bin/$t"; done
cp -r "$out/argo/share/argo-crds" "$out/argo/share/argo-version" "$tmp/share/"
cp -r "$box_dir/share/kwok-stages" "$box_dir/share/karpenter-crds" "$tmp/share/"
touch "$tmp/.complete"
rm -rf "$view" && mv "$tmp" "$view"

# Older pins of this version, and folders for build.sh's older builds: of no further use.
for old in "$cache_root/$minor"-*/; do
  [ "${old%/}" = "$out" ] || rm -rf "$old"
done
for old in "$out"/box-*/; do
  [ "${old%/}" = "$view" ] || rm -rf "$old"
done
echo "$view/bin"
