"""The kaiflow operator (kopf): a Workspace in the cluster becomes an Argo Workflow, and its status
tells Kaito users where it stands.

* ``controller.decide`` — what must exist for a Workspace at its generation (pure, on
  ``pipelines.manifest``);
* ``controller.status`` — the status and conditions from the Workflow, Deployment and pods (pure);
* ``controller.operator`` — the kopf handlers that compare, apply and report;
* ``controller.options`` — ``kaiflow controller``'s settings;
* ``controller/manifests/`` — the install (``kubectl apply -k controller/manifests``).

Nothing imports this package: it is run (``kaiflow controller``, ``python -m controller``).
"""
