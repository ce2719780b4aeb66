"""Rows already in kaiflow's layout, checked and kept as Arrow arrays instead of Python objects.

The per-row Python path (``to_pylist`` → ``formats.normalise_row`` → back to Arrow for the
writer) costs about 70 µs a row: a 1 GB parquet of ~1 KiB chat rows takes 75 s after a 7 s
download. When a batch's column already has the type kaiflow writes — ``messages`` as a list of
structs with string ``role`` and ``content`` (other struct fields are dropped, as the Python path
drops them), or ``text`` as a string — Arrow compute applies the same rules to the whole batch:

* ``messages``: a non-empty list; every message non-null, its role ``system``/``user``/``assistant``,
  its content a non-null string that is not blank for user and assistant turns; at least one
  assistant turn;
* ``text``: a non-null string that is not blank.

"Blank" is Python's ``str.strip()`` notion of whitespace (``NOT_BLANK``), so both paths agree. Rows
that pass are *certainly* good and are written as Arrow slices with their token estimates; every
other row goes through ``normalise_row`` as before, so a rejected row's reason — and any row
the rules here do not cover — is exactly the Python path's. A test runs both paths on the same
rows and compares the outputs.
"""

from __future__ import annotations

from typing import Any

# A character str.isspace() calls whitespace is not one of these (RE2 syntax).
NOT_BLANK = (r"[^\x{9}-\x{d}\x{1c}-\x{20}\x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}"
             r"\x{205f}\x{3000}]")
ROLES = ("system", "user", "assistant")


def _is_text(kind) -> bool:
    import pyarrow as pa

    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def canonical(fmt: str, column) -> tuple[Any, Any, Any] | None:
    """``(certainly good mask, the normalised array, token estimates)`` for a batch's column, or
    None when the column's type is not the canonical one (the caller then uses the Python path)."""
    if fmt == "text":
        return _text(column)
    if fmt == "messages":
        return _messages(column)
    return None


def _not_blank(strings):
    import pyarrow.compute as pc

    return pc.fill_null(pc.match_substring_regex(strings, NOT_BLANK), False)


def _tokens(chars):
    import numpy as np

    # estimate_tokens: max(1, round(chars / 4)); numpy rounds half to even, as Python's round does.
    return np.maximum(1, np.round(chars / 4)).astype(np.int64)


def _text(column):
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if not _is_text(column.type):
        return None
    good = _not_blank(column).to_numpy(zero_copy_only=False)
    chars = pc.fill_null(pc.utf8_length(column), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    return good, column.cast(pa.string()), _tokens(chars)


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
    n = len(column)
    values = column.flatten()  # the messages of these rows (respects slicing; null lists add none)
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
    parents = np.repeat(np.arange(n), lengths)  # the row of each message, exactly as flatten laid them out
    role = pc.struct_field(values, "role")
    content = pc.struct_field(values, "content")
    present = values.is_valid()
    is_system = pc.fill_null(pc.equal(role, "system"), False)
    known = pc.fill_null(pc.is_in(role, value_set=pa.array(ROLES)), False)
    ok = pc.and_(pc.and_(present, known), pc.and_(content.is_valid(), pc.or_(is_system, _not_blank(content))))
    ok = ok.to_numpy(zero_copy_only=False)
    assistant = pc.fill_null(pc.equal(role, "assistant"), False).to_numpy(zero_copy_only=False)
    ok_count = np.bincount(parents, weights=ok, minlength=n)
    assistant_count = np.bincount(parents, weights=assistant & ok, minlength=n)
    good = column.is_valid().to_numpy(zero_copy_only=False) & (lengths > 0) & (ok_count == lengths) & (assistant_count > 0)
    chars = pc.fill_null(pc.utf8_length(content), 0).to_numpy(zero_copy_only=False).astype(np.int64) + 8
    tokens = _tokens(np.bincount(parents, weights=chars, minlength=n))
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    slim = pa.StructArray.from_arrays([role.cast(pa.string()), content.cast(pa.string())], fields=list(message))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    normalised = pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), slim, type=pa.list_(message))
    return good, normalised, tokens
