"""numpy views of Arrow arrays, and Arrow arrays of numpy data, straight from their buffers.

pyarrow's own conversions (``Array.to_numpy``, ``pa.array``) import pandas the first time they
run, when it is installed: 0.2 s on a quiet machine, several times that under load, which the
fetch step's Arrow path never needs. These helpers read and build the buffers directly (``offset``
and validity handled); nothing is copied except where bits become bytes.
"""

from __future__ import annotations

from typing import Any


def _bits(buffer, offset: int, n: int):
    import numpy as np

    first, last = offset // 8, (offset + n + 7) // 8
    raw = np.frombuffer(buffer, dtype=np.uint8)[first:last]
    return np.unpackbits(raw, bitorder="little")[offset % 8:offset % 8 + n].view(bool)


def valid(array) -> Any:
    """Which entries of ``array`` are not null (numpy bool)."""
    import numpy as np

    n = len(array)
    if not array.null_count:
        return np.ones(n, dtype=bool)
    return _bits(array.buffers()[0], array.offset, n)


def booleans(array) -> Any:
    """A boolean array's values, null as False (numpy bool)."""
    import numpy as np

    n = len(array)
    if not n:
        return np.zeros(0, dtype=bool)
    values = _bits(array.buffers()[1], array.offset, n)
    return values & valid(array) if array.null_count else values


def integers(array, null: int = 0) -> Any:
    """An integer array's values as numpy int64, ``null`` where null."""
    import numpy as np
    import pyarrow as pa

    n = len(array)
    if not n:
        return np.zeros(0, dtype=np.int64)
    sign = "int" if pa.types.is_signed_integer(array.type) else "uint"
    dtype = np.dtype(f"{sign}{array.type.bit_width}")
    values = np.frombuffer(array.buffers()[1], dtype=dtype)[array.offset:array.offset + n].astype(np.int64)
    if array.null_count:
        values[~valid(array)] = null
    return values


def offsets(array) -> Any:
    """The n + 1 offsets of a string, binary or list array (numpy int64), as stored (absolute)."""
    import numpy as np
    import pyarrow as pa

    kind = array.type
    large = pa.types.is_large_string(kind) or pa.types.is_large_binary(kind) or pa.types.is_large_list(kind)
    stored = np.frombuffer(array.buffers()[1], dtype=np.int64 if large else np.int32)
    return stored[array.offset:array.offset + len(array) + 1].astype(np.int64)


def arrow_booleans(mask) -> Any:
    """A numpy bool array as an Arrow boolean array."""
    import numpy as np
    import pyarrow as pa

    packed = np.packbits(np.asarray(mask, dtype=bool), bitorder="little")
    return pa.Array.from_buffers(pa.bool_(), len(mask), [None, pa.py_buffer(packed)])


def arrow_integers(values, kind=None) -> Any:
    """A numpy integer array as an Arrow int64 (or ``kind``: int32) array."""
    import numpy as np
    import pyarrow as pa

    kind = kind or pa.int64()
    data = np.ascontiguousarray(values, dtype=np.int32 if kind == pa.int32() else np.int64)
    return pa.Array.from_buffers(kind, len(data), [None, pa.py_buffer(data)])


def arrow_strings(texts: list[str], kind=None) -> Any:
    """Python strings as an Arrow string (or ``kind``: large_string) array."""
    import numpy as np
    import pyarrow as pa

    kind = kind or pa.string()
    encoded = [t.encode() for t in texts]
    ends = np.cumsum([0, *map(len, encoded)], dtype=np.int64 if kind == pa.large_string() else np.int32)
    return pa.Array.from_buffers(kind, len(texts), [None, pa.py_buffer(ends), pa.py_buffer(b"".join(encoded))])
