//go:build tools

// Package tools pins kwok, which fakes the nodes and the pod lifecycle of the cluster box.
package tools

import _ "sigs.k8s.io/kwok/cmd/kwok"
