"""A tune log a person can read: one line per logged step, no progress bars, each library warning once.

The step's log is what it writes to stderr (``kaiflow run`` keeps it as the task's log, Argo as the
pod's) and, with ``KAIFLOW_STEP_LOG``, a file on the data volume (``stepkit.common.setup_logging``).
The libraries would fill both with tqdm bars (dataset mapping, weight loading), a dict printed per
logged step beside kaiflow's own line, and the same deprecation warnings again and again. Here:

* progress bars off (datasets, transformers, huggingface_hub); the trainer's printer and progress
  callbacks are removed by ``steps.tune.model.build_trainer`` — kaiflow logs one line per step;
* transformers' logger and Python warnings go through the root logger, in the step's format;
* a warning from a library is shown the first time its text appears and counted afterwards
  (``RepeatFilter``); the count is logged at the end of the run.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import Counter

class RepeatFilter(logging.Filter):
    """Lets each library warning text through once; kaiflow's own lines always pass."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter[tuple[str, str]] = Counter()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("kaiflow") or record.levelno < logging.WARNING:
            return True
        decided = getattr(record, "kaiflow_first", None)  # the same record reaches every handler
        if decided is None:
            key = (record.name, record.getMessage())
            self.seen[key] += 1
            decided = record.kaiflow_first = self.seen[key] == 1
        return decided

    @property
    def repeats(self) -> int:
        return sum(count - 1 for count in self.seen.values())


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings as one log line (the default is two, the second a source line)."""
    logging.getLogger("py.warnings").warning("%s: %s (%s:%d)", category.__name__, message,
                                             os.path.basename(filename), lineno)


def quiet_libraries() -> RepeatFilter:
    """Apply the rules above for this process; the filter counts what it held back."""
    # the ML stack is imported here, not at the top: importing steps.tune stays light
    import datasets
    import transformers

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_default_handler()  # its own stderr handler, without the step's format
    transformers.utils.logging.enable_propagation()
    warnings.simplefilter("default")  # once per place, not the "ignore" of some defaults nor "always"
    warnings.showwarning = _show_warning
    handlers = logging.getLogger().handlers
    repeats = next((f for h in handlers for f in h.filters if isinstance(f, RepeatFilter)), None) or RepeatFilter()
    for handler in handlers:
        if repeats not in handler.filters:
            handler.addFilter(repeats)
    return repeats
