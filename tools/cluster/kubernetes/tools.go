//go:build tools

// Package tools pins the Kubernetes commands the cluster box builds: `go build -o` each listed
// package from this module (see tools/cluster/build.sh). Nothing here is run as Go code.
package tools

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
)
