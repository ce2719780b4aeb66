"""Rows already in (or one step from) kaiflow's layout, checked and normalised as Arrow arrays.

The per-row Python path (``to_pylist`` → ``formats.normalise_row`` → back to Arrow for the
writer) costs about 70 µs a row: a 1 GB parquet of ~1 KiB chat rows takes 75 s after a 7 s
download. When a batch's columns have the types below, Arrow compute and numpy apply the same
rules as ``formats.normalise_row`` to the whole batch:

* ``messages``, a list of structs with string ``role`` and ``content`` (other struct fields are
  dropped, as the Python path drops them): a non-empty list; every message non-null, its role
  ``system``/``user``/``assistant``, its content a non-null string that is not blank for user and
  assistant turns; at least one assistant turn;
* ``prompt`` + ``completion``, both strings: each non-null, not blank, and not starting (after
  whitespace) with ``[`` or ``{`` — such a string is JSON to the Python path, which decodes it;
  the row becomes a user and an assistant message;
* ``text``, a string: non-null and not blank.

"Blank" is Python's ``str.strip()`` notion of whitespace (``NOT_BLANK``), so both paths agree. A
string whose first byte is printable ASCII is settled by that byte; only the others (empty,
leading whitespace or a non-ASCII first character) go through the RE2 pattern. Character counts
for the token estimate are byte counts when the batch's text is ASCII, else ``utf8_length``.

Rows that pass are *certainly* good and are written as Arrow arrays with their token estimates;
every other row goes through ``normalise_row`` as before, so a rejected row's reason — and any row
the rules here do not cover — is exactly the Python path's. Tests run both paths on the same
rows and compare the outputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from steps.fetch_dataset.buffers import arrow_integers, arrow_strings, booleans, integers, offsets, valid

# A character str.isspace() calls whitespace is not one of these (RE2 syntax).
SPACE = (r"\x{9}-\x{d}\x{1c}-\x{20}\x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}"
         r"\x{205f}\x{3000}")
NOT_BLANK = f"[^{SPACE}]"
# After leading whitespace, a character that is neither whitespace nor the start of JSON.
PLAIN_TEXT = rf"^[{SPACE}]*[^{SPACE}\[{{]"
ROLES = ("system", "user", "assistant")
_JSON_START = (ord("["), ord("{"))


def canonical(fmt: str, columns: Mapping[str, Any]) -> tuple[Any, Any, Any] | None:
    """``(certainly good mask, the normalised array, token estimates)`` for a batch, or None when
    the format or a column's type is not one handled here (the caller then uses the Python path).

    ``columns``: a ``RecordBatch`` or a mapping with the format's canonical column names.
    """
    if fmt == "text":
        return _text(columns["text"])
    if fmt == "messages":
        return _messages(columns["messages"])
    if fmt == "prompt":
        return _prompt(columns["prompt"], columns["completion"])
    return None


def _is_text(kind) -> bool:
    import pyarrow as pa

    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


class _Strings:
    """A string array's offsets, bytes and validity as numpy views."""

    def __init__(self, array) -> None:
        import numpy as np

        self.array = array
        n = len(array)
        self.offsets = offsets(array) if n else np.zeros(1, dtype=np.int64)
        data = array.buffers()[2] if n else None
        self.data = np.frombuffer(data, dtype=np.uint8) if data is not None and data.size else np.zeros(0, np.uint8)
        self.valid = valid(array)
        self.lengths = np.diff(self.offsets)

    def ascii(self) -> bool:
        """Whether every byte of these strings is ASCII."""
        lo, hi = int(self.offsets[0]), int(self.offsets[-1])
        return hi <= lo or int(self.data[lo:hi].max()) < 0x80

    def chars(self):
        """Characters per string (``len`` in Python); 0 for null."""
        import numpy as np
        import pyarrow.compute as pc

        counts = self.lengths if self.ascii() else integers(pc.utf8_length(self.array))
        return np.where(self.valid, counts, 0)

    def matching(self, pattern: str, unsettled: tuple[int, ...] = ()):
        """Valid strings in which ``pattern`` finds a match. A first byte that is printable ASCII
        (and not one of ``unsettled``) settles it as True; the pattern runs on the others."""
        import numpy as np
        import pyarrow.compute as pc

        if self.data.size:
            first = self.data[np.minimum(self.offsets[:-1], self.data.size - 1)]
            result = self.valid & (self.lengths > 0) & (first > 0x20) & (first < 0x80)
            for byte in unsettled:
                result &= first != byte
        else:
            result = np.zeros(len(self.array), dtype=bool)
        rest = np.flatnonzero(self.valid & ~result)
        if rest.size:
            result[rest] = booleans(pc.match_substring_regex(self.array.take(arrow_integers(rest)), pattern))
        return result


def _tokens(chars):
    import numpy as np

    # estimate_tokens: max(1, round(chars / 4)); numpy rounds half to even, as Python's round does.
    return np.maximum(1, np.round(chars / 4)).astype(np.int64)


def _row_sums(values, row_offsets):
    """Per row, the sum of ``values`` over ``row_offsets[i]:row_offsets[i + 1]`` (offsets from 0)."""
    import numpy as np

    running = np.concatenate([[0], np.cumsum(values, dtype=np.int64)])
    return running[row_offsets[1:]] - running[row_offsets[:-1]]


def _as_string(array):
    import pyarrow as pa

    return array if pa.types.is_string(array.type) else array.cast(pa.string())


def _message_type():
    import pyarrow as pa

    return pa.struct([("role", pa.string()), ("content", pa.string())])


def _chat(row_offsets, role, content):
    """The list<struct<role, content>> array of these messages and row offsets (from 0)."""
    import pyarrow as pa

    message = _message_type()
    slim = pa.StructArray.from_arrays([_as_string(role), _as_string(content)], fields=list(message))
    return pa.ListArray.from_arrays(arrow_integers(row_offsets, pa.int32()), slim, type=pa.list_(message))


def _text(column):
    if not _is_text(column.type):
        return None
    strings = _Strings(column)
    good = strings.matching(NOT_BLANK)
    return good, _as_string(column), _tokens(strings.chars())


def _messages(column):
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = column.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) or not pa.types.is_struct(kind.value_type):
        return None
    struct = kind.value_type
    names = [struct.field(i).name for i in range(struct.num_fields)]
    if "role" not in names or "content" not in names:
        return None
    if not _is_text(struct.field("role").type) or not _is_text(struct.field("content").type):
        return None
    # The rows' messages by offsets, not flatten(): a null row's messages (if any) count only there.
    absolute = offsets(column) if len(column) else np.zeros(1, dtype=np.int64)
    row_offsets = absolute - absolute[0]
    values = column.values.slice(int(absolute[0]), int(row_offsets[-1]))
    lengths = np.diff(row_offsets)
    role = values.field("role")
    content = _Strings(values.field("content"))
    # the role's index in ROLES; -1 for another role or a null one (index_in answers null)
    which = integers(pc.index_in(role, value_set=arrow_strings(list(ROLES), role.type)), null=-1)
    is_system, is_assistant = which == 0, which == 2
    ok = valid(values) & (which >= 0) & content.valid & (is_system | content.matching(NOT_BLANK))
    good = (valid(column) & (lengths > 0) & (_row_sums(ok, row_offsets) == lengths)
            & (_row_sums(is_assistant & ok, row_offsets) > 0))
    tokens = _tokens(_row_sums(content.chars() + 8, row_offsets))
    return good, _chat(row_offsets, role, content.array), tokens


def _prompt(prompt, completion):
    import numpy as np
    import pyarrow as pa

    if not _is_text(prompt.type) or not _is_text(completion.type):
        return None
    n = len(prompt)
    prompts, completions = _Strings(prompt), _Strings(completion)
    good = prompts.matching(PLAIN_TEXT, _JSON_START) & completions.matching(PLAIN_TEXT, _JSON_START)
    tokens = _tokens(prompts.chars() + completions.chars() + 16)
    # [user: prompt i, assistant: completion i] per row: the two columns interleaved.
    order = np.empty(2 * n, dtype=np.int64)
    order[0::2] = np.arange(n)
    order[1::2] = np.arange(n) + n
    content = pa.concat_arrays([_as_string(prompt), _as_string(completion)]).take(arrow_integers(order))
    role = pa.DictionaryArray.from_arrays(arrow_integers(np.tile([0, 1], n), pa.int32()),
                                          arrow_strings(["user", "assistant"])).cast(pa.string())
    return good, _chat(np.arange(0, 2 * n + 1, 2), role, content), tokens
