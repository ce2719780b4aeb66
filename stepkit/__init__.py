"""The kit every step is built from, one layer below ``steps/``: what the steps (and the controller
and CLI, for the Kubernetes client and ``StepError``) share.

* ``common`` — the step conventions: typed config → flags, outputs as files, exit codes.
* ``kube`` — the one Kubernetes client (server-side apply, error mapping, "API unreachable").
* ``oci`` — the registry client (references, auth, retries, manifests, adapter annotations).
* ``retry`` — the one retry policy; ``redaction`` — secrets out of URLs and log lines.

Nothing here knows a particular step; ``steps/`` holds only the steps (``python -m steps.<name>``).
"""
