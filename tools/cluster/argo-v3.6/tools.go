//go:build tools

// Package tools pins Argo Workflows v3.6's workflow-controller and argo CLI, for the cluster box
// run with KAIFLOW_ARGO=v3.6 (tools/cluster/build-argo.sh). Unlike v3.7 (../argo), v3.6's CLI
// builds straight from the module zip: its UI is packed into server/static/files.go, which the zip
// ships as the no-UI stub.
package tools

import (
	_ "github.com/argoproj/argo-workflows/v3/cmd/argo"
	_ "github.com/argoproj/argo-workflows/v3/cmd/workflow-controller"
)
