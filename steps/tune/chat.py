"""The chat template a tune trains with: assistant-only loss needs ``{% generation %}`` markers.

trl masks the loss to assistant tokens from the ``assistant_masks`` that
``apply_chat_template(..., return_assistant_tokens_mask=True)`` returns, and those exist only when
the template wraps assistant content in ``{% generation %}...{% endgeneration %}``. Few shipped
templates do. The training template is chosen so that it renders exactly what the model is served
with, plus the markers:

1. the tokenizer's own template when it already has markers;
2. trl's patched copy of a template it knows (Phi-3, Llama 3, Qwen, Gemma, ...);
3. for any ChatML template (``<|im_start|>role\\n...<|im_end|>``, e.g. SmolLM2 and the
   ``chatml`` presets) a ChatML training template — keeping the default system prompt the
   model's template inserts when a conversation has none, so training and serving agree;
4. otherwise the tune fails with a clear message (set ``ModelConfig.chat_template`` to a
   template with markers, or train on ``text`` rows).

The end-of-turn token sits inside the generation block so the model learns to stop.
"""

from __future__ import annotations

import codecs
import re
from pathlib import Path

from stepkit.common import StepError

CHATML_TRAINING_TEMPLATE = (
    "{%- set default_system = DEFAULT_SYSTEM -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' and default_system -%}"
    "{{ '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", re.S)


def load_template_setting(value: str) -> str:
    """Kaito's ``ModelConfig.chat_template``: inline Jinja (escaped, one line) or a file path."""
    if any(c in value for c in "{}\n"):
        return codecs.decode(value, "unicode_escape")
    path = Path(value)
    if not path.is_file():
        raise StepError(f"training_config.ModelConfig.chat_template: no such file {value}")
    return path.read_text()


def chatml_training_template(native: str | None) -> str:
    default_system = ""
    if native and "!= 'system'" in native.replace('"', "'"):
        match = _DEFAULT_SYSTEM.search(native)
        if match:
            default_system = match.group(1)
    return CHATML_TRAINING_TEMPLATE.replace("DEFAULT_SYSTEM", repr(default_system))


def training_template(tokenizer) -> str:
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    native = tokenizer.chat_template
    if isinstance(native, dict):
        native = native.get("default")
    if native and has_generation_markers(native):
        return native
    if native:
        try:
            patched = get_training_chat_template(tokenizer)
        except (ValueError, NotImplementedError):
            patched = None
        if patched:
            return patched
    if native is None or "<|im_start|>" in native:
        return chatml_training_template(native)
    raise StepError(
        "the model's chat template has no {% generation %} markers and no known training variant: set "
        "training_config.ModelConfig.chat_template to a template with markers around assistant content"
    )
