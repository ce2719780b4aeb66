"""The BentoML service: ``bentoml serve serving_bento.service:KaiflowChat``.

BentoML supplies the server (uvicorn workers under a supervisor), ``/healthz`` ``/livez``
``/readyz`` ``/metrics`` and the packaging (``bentoml build`` with ``serving_bento/bentofile.yaml``).
The chat endpoints live in a Starlette app mounted at ``/`` (:mod:`serving_bento.app`), because
they need what BentoML's typed ``@bentoml.api`` methods do not give: server-sent events in
OpenAI's shape, OpenAI-style error bodies, a body-size limit and a bearer key.

One worker holds the model and runs the batching engine in a thread; concurrency comes from
batching inside that worker, not from more workers (each would hold a copy of the model).
Configuration: environment variables, see :mod:`serving_bento.config` and docs/user-guide/serving.md.
"""

from __future__ import annotations

import logging
import os

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import bentoml  # noqa: E402

from serving_bento.app import app, set_backend  # noqa: E402
from serving_bento.config import ServiceConfig  # noqa: E402

log = logging.getLogger("kaiflow.serving")
# BentoML configures only its own loggers; without this the model-loading lines would be dropped
log.setLevel(logging.INFO)


@bentoml.asgi_app(app, path="/")
@bentoml.service(
    name="kaiflow-chat",
    workers=1,
    traffic={"timeout": 600, "max_concurrency": 256},
    http={"cors": {"enabled": False}},
)
class KaiflowChat:
    def __init__(self) -> None:
        from serving_bento.backend import ChatBackend

        self.config = ServiceConfig.from_env()
        log.info("starting with %r", self.config)
        self.backend = ChatBackend(self.config)
        set_backend(self.backend)
        self.backend.start_loading()

    def __is_ready__(self) -> bool:
        return self.backend.ready

    def __is_alive__(self) -> bool:
        return self.backend.alive

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self.backend.shutdown()
