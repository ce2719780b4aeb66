"""Running a DAG on this machine (``kaiflow run``): what ``pipelines/`` defines, executed locally.

``runner`` walks the Workflow Hera built, task by task, as Argo would (``expressions`` evaluates
its ``depends``/``when`` and parameter references; ``supervise`` starts each step as a process
group and ends it, leftovers of a killed run included); ``progress`` and ``console`` show it on a
terminal; ``local_registry`` is the local OCI registry (``kaiflow registry``, the tests).

The definition never imports this package: ``pipelines`` > ``local_runner`` is one way only
(pyproject's ``[tool.importlinter]``).
"""
