//go:build tools

// Package tools pins Argo Workflows' workflow-controller. The `argo` CLI is built
// from a copy of this module's tree (its UI package embeds files the module zip lacks): see
// tools/cluster/build.sh.
package tools

import (
	_ "github.com/argoproj/argo-workflows/v3/cmd/workflow-controller"
)
