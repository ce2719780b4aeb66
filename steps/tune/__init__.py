"""Step ``tune``: LoRA / QLoRA fine-tuning with trl's SFTTrainer that resumes, measures and reports.

``python -m steps.tune --preset NAME --method {lora,qlora} --dataset-dir DIR --output-dir DIR
--checkpoint-dir DIR [--config training_config.yaml] [--dataset-digest D] [--max-steps N]``

Settings are layered, later wins: preset and device defaults → Kaito's ``training_config.yaml``
(``steps.tune.kaito_training_config`` checks every key; ``steps.tune.plan`` layers them) → command-line
flags → what the workflow must own (paths, checkpointing, reporting). Device-aware defaults:

* CPU: fp32 weights and fp32 compute everywhere — bf16 matmuls have no fast path on most CPUs
  (NF4 with bf16 compute measured 45 s/step against 5 s/step in fp32) — and no gradient
  checkpointing, which only trades compute for memory a CPU host rarely lacks.
* CUDA: bf16 where the GPU supports it (else fp16), gradient checkpointing on for QLoRA.
* ``qlora``: NF4 base with double quantisation (bitsandbytes); ``lora``: a full-precision base.

No compute goes to padding: rows are packed best-fit-decreasing into ``max_length`` blocks and a
batch is flattened into one sequence with ``position_ids`` restarting per example (trl's
``packing_strategy="bfd"``, padding-free). transformers turns those position ids into a
block-diagonal mask for SDPA, so packed examples never attend to each other — on CPU too, no
FlashAttention needed. Chat rows train on assistant tokens only (``steps.tune.chat`` supplies a
template with ``{% generation %}`` markers where the model's own lacks them).

Resume: checkpoints go to ``--checkpoint-dir`` every ``save_steps``. A checkpoint counts only once
a marker file is written after the trainer's save returned, so a kill during a save leaves a
directory that is ignored (and removed) on the next start. A rerun with the same arguments
continues from the newest complete checkpoint, with optimizer, scheduler, RNG and data order
restored by the trainer. ``kaiflow-run.json`` in the checkpoint dir records what the run was
(preset, method, dataset digest, settings); a rerun that differs is refused rather than mixing
two trainings — except ``--max-steps``, which may grow to train further.

Reports: the memory estimate from ``presets.sizing`` before training and the measured peak after
(RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA), ``done/total`` steps to
``ARGO_PROGRESS_FILE``, held-out loss before and after, tokens/s (real tokens only: there is no
padding), ``loss.json`` and ``loss.png``, and ``kaiflow.json`` beside the PEFT adapter.

The package, one module per part: ``config`` (``TuneConfig``, the step's flags), ``kaito_training_config``
(Kaito's ``training_config.yaml`` ConfigMap), ``plan`` (settings → ``LoraConfig``, ``SFTConfig``,
``BitsAndBytesConfig``), ``chat`` (the training chat template), ``model`` (tokenizer, base model,
trainer), ``checkpoints`` (resume), ``report`` (``loss.json``, ``loss.png``), ``run`` (the tune and
its atomic adapter folder), ``evaluate`` (scoring adapters on held-out rows, for the eval gate).
Importing it is light: the ML libraries load inside the functions that use them.
"""

from steps.tune.config import TuneConfig
from steps.tune.plan import Plan, detect_device, make_plan
from steps.tune.run import build_parser, main, tune

__all__ = ["Plan", "TuneConfig", "build_parser", "detect_device", "main", "make_plan", "tune"]
