"""The BentoML chat service (``bentoml serve serving_bento.service:KaiflowChat``); see docs/user-guide/serving.md.

Modules: ``service`` (the Bento), ``app`` and ``openai_api`` (HTTP endpoints), ``schemas`` (request
validation), ``backend`` (model loading in the background, prompts, streaming), ``engine`` (the
batching generate loop), ``adapters`` (PEFT adapters combined with strengths), ``config`` (env vars).
Nothing here imports torch at module level except inside functions.
"""
