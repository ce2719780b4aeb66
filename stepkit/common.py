"""What every step shares: output parameters, Argo progress, logging and error exits.

A step is a plain CLI (`python -m steps.<name> ...`). It knows nothing of Argo: it writes each
output parameter as a file named after the output in ``--outputs`` (Argo reads them with
``valueFrom.path``; the local runner reads the same files), reports progress to the file named by
``ARGO_PROGRESS_FILE`` when that variable is set, and fails with one clear line so the failing
task's log tail says what went wrong.

Exit codes: 0 done; 2 bad input or a failure only a person can fix (``StepError``: a wrong flag,
a 4xx answer, rejected credentials, corrupt data), which the pipeline does not retry; 1 a failure
that may pass (``RetryableError``: a timeout, 5xx or connection errors that outlasted the step's
own retries, no capacity yet), which the templates' retry strategy retries after a backoff (it
retries every exit code except 2).

Every step's command line is built from its typed config dataclass by
``add_dataclass_arguments`` and read back by ``dataclass_from_args``: one ``--flag`` per field,
with the field's type, default and help text; see ``add_dataclass_arguments`` for the rules.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path, PurePath
from typing import Any, TypeVar

log = logging.getLogger("kaiflow.steps")

DEFAULT_OUTPUTS_DIR = "outputs"


class StepError(Exception):
    """Bad input or a failed precondition: reported as one line, exit code 2, no traceback."""


class RetryableError(StepError):
    """A failure that may pass: no capacity yet, a timeout, a service unavailable after retries.

    Still one clear line, but exit code 1, not 2: the pipeline's retry strategy retries every
    exit code except 2 (bad input), so these failures get another attempt after a backoff.
    """


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--outputs",
        default=os.environ.get("KAIFLOW_OUTPUTS", DEFAULT_OUTPUTS_DIR),
        help="directory where output parameters are written, one file per output name",
    )


def write_output(outputs_dir: str | os.PathLike[str], name: str, value: Any) -> Path:
    """Write one output parameter; dicts and lists are written as JSON, the rest as text."""
    directory = Path(outputs_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    text = json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else str(value)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def read_output(outputs_dir: str | os.PathLike[str], name: str) -> str:
    return (Path(outputs_dir) / name).read_text()


def report_progress(done: int, total: int) -> None:
    """Tell Argo how far a long step is (`done/total`, shown in the UI); no-op outside Argo."""
    progress_file = os.environ.get("ARGO_PROGRESS_FILE")
    if not progress_file or total <= 0:
        return
    try:
        Path(progress_file).write_text(f"{min(done, total)}/{total}\n")
    except OSError as exc:  # progress is advisory: never fail a step for it
        log.debug("cannot write progress file %s: %s", progress_file, exc)


# A file the step's log is also written to (appended: a retried pod adds to its predecessor's), e.g.
# the tune step's log on the data volume, which push-adapter puts inside the adapter image.
STEP_LOG_ENV = "KAIFLOW_STEP_LOG"
# "refuse": the tune step refuses ModelConfig.trust_remote_code (the pipelines set it in a cluster
# unless the admin allowed remote code for the namespace or model: the controller's --allow-remote-code).
REMOTE_CODE_ENV = "KAIFLOW_REMOTE_CODE"


def write_private(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write a file only its owner may read, from its first byte: created 0600 (a file written with
    the umask's mode and chmod-ed after is readable by others in between), never through a symlink."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), 0o600)  # an existing file keeps its old mode through O_CREAT
        out.write(raw)
    return path
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
    path = os.environ.get(STEP_LOG_ENV)
    if path and not any(getattr(h, "baseFilename", None) == os.path.abspath(path) for h in logging.root.handlers):
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            handler = logging.FileHandler(path, mode="a", encoding="utf-8")
        except OSError as exc:  # a log that cannot be kept never fails the step
            logging.getLogger("kaiflow").warning("%s=%s: cannot write the step log there (%s)", STEP_LOG_ENV, path, exc)
            return
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logging.root.addHandler(handler)


def _log_failure(message: str) -> None:
    print(message, file=sys.stderr)
    if os.environ.get(STEP_LOG_ENV):  # stderr has it already; the step log gets it too
        for handler in logging.root.handlers:
            if isinstance(handler, logging.FileHandler):
                handler.emit(logging.LogRecord("kaiflow.step", logging.ERROR, "", 0, message, None, None))


def run_step(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a step's main with the shared error policy; returns the process exit code."""
    setup_logging(verbose=bool(os.environ.get("KAIFLOW_DEBUG")))
    try:
        return int(main(argv) or 0)
    except RetryableError as exc:
        _log_failure(f"error: {exc}")
        return 1
    except StepError as exc:
        _log_failure(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


# -- command lines from config dataclasses ------------------------------------------------------

FIELD_METADATA = ("help", "flag", "metavar", "choices")
C = TypeVar("C")


def flag_of(f: dataclasses.Field) -> str:
    """The option that sets field ``f``: ``metadata["flag"]``, else ``--field-name``."""
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def _unwrap_optional(kind: Any) -> Any:
    """``X | None`` -> ``X``; anything else unchanged."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [t for t in typing.get_args(kind) if t is not type(None)]
        if len(args) == 1:
            return args[0]
    return kind



def _converter(kind: Any, where: str) -> Any:
    """The argparse ``type`` for a scalar field type (None: the string as given)."""
    if kind is str:
        return None
    if kind in (int, float) or (isinstance(kind, type) and issubclass(kind, PurePath)):
        return kind
    raise TypeError(f"{where}: no command-line form for type {kind!r} (use str, int, float, bool, a Path, "
                    "or a list/tuple/dict of them)")


def add_dataclass_arguments(parser: argparse.ArgumentParser | Any, cls: type, *,
                            env: dict[str, str] | None = None) -> None:
    """Add one option per field of the dataclass ``cls`` to ``parser`` (or an argument group).

    * The option is ``--field-name`` (``metadata["flag"]`` names another), ``dest`` the field name,
      the help ``metadata["help"]`` (argparse's ``%(default)s`` may show the default);
      ``metadata["metavar"]`` and ``metadata["choices"]`` are passed on.
    * A field without a default is a required option.
    * ``int``, ``float`` and ``Path`` fields (also ``X | None``) convert their value; ``str`` keeps it.
    * ``bool``: a switch. ``--flag`` when the default is False; ``--flag/--no-flag`` when it is
      True, since a switch that can only turn a true default on would be useless.
    * ``list``, ``tuple`` and ``dict`` fields are repeatable options collecting every value (they
      must default to empty). ``dict[str, str]`` takes ``KEY=VALUE`` items, checked and split by
      :func:`dataclass_from_args`.
    * ``env`` maps field names to environment variables: a set variable is the default (and the
      option is then no longer required); the help says which variable it is.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        where = f"{cls.__name__}.{f.name}"
        unknown = set(f.metadata) - set(FIELD_METADATA)
        if unknown:
            raise TypeError(f"{where}: unknown metadata {sorted(unknown)} (known: {', '.join(FIELD_METADATA)})")
        kind = _unwrap_optional(hints[f.name])
        kwargs: dict[str, Any] = {"dest": f.name, "help": f.metadata.get("help", "")}
        for key in ("metavar", "choices"):
            if key in f.metadata:
                kwargs[key] = f.metadata[key]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        variable = (env or {}).get(f.name)
        if variable and os.environ.get(variable):
            default, required = os.environ[variable], False
            kwargs["help"] += f" (default: ${variable})"
        elif variable:
            kwargs["help"] += f" (or ${variable})"

        origin = typing.get_origin(kind)
        if kind is bool:
            action = argparse.BooleanOptionalAction if default is True else "store_true"
            parser.add_argument(flag_of(f), action=action, default=bool(default), **kwargs)
        elif origin in (list, tuple, dict):
            if default:
                raise TypeError(f"{where}: a repeatable option must default to empty, not {default!r}")
            if origin is not dict:
                item = typing.get_args(kind)[0] if typing.get_args(kind) else str
                if _converter(item, where):
                    kwargs["type"] = _converter(item, where)
            if required:
                parser.add_argument(flag_of(f), action="append", required=True, **kwargs)
            else:
                parser.add_argument(flag_of(f), action="append", default=[], **kwargs)
        else:
            if _converter(kind, where):
                kwargs["type"] = _converter(kind, where)
            if required:
                parser.add_argument(flag_of(f), required=True, **kwargs)
            else:
                parser.add_argument(flag_of(f), default=default, **kwargs)


def parse_key_values(items: Iterable[str], flag: str) -> dict[str, str]:
    """``KEY=VALUE`` items (key and value stripped; a later key wins); StepError naming ``flag``."""
    pairs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise StepError(f"{flag}: expected KEY=VALUE, got {item!r}")
        pairs[key.strip()] = value.strip()
    return pairs


def dataclass_from_args(cls: type[C], args: argparse.Namespace) -> C:
    """The ``cls`` instance that options added by :func:`add_dataclass_arguments` describe."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name)
        kind = _unwrap_optional(hints[f.name])
        origin = typing.get_origin(kind)
        if origin is dict:
            value = parse_key_values(value or [], flag_of(f))
        elif origin is tuple:
            value = tuple(value or ())
        elif origin is list:
            value = list(value or [])
        elif kind in (int, float) and isinstance(value, str):  # a default from the environment
            try:
                value = kind(value)
            except ValueError:
                raise StepError(f"{flag_of(f)}: {value!r} is not a number") from None
        values[f.name] = value
    return cls(**values)
