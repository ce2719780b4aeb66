"""Model presets and the GPU catalog: data plus a small interface.

Light to import (no torch): `kaiflow validate` uses it. Loading weights lives in
`presets.local`, which imports transformers only when called.
"""

from presets.catalog import (
    KaitoFigures,
    Preset,
    UnknownPresetError,
    closest_presets,
    get_preset,
    legacy_names,
    list_presets,
    preset_names,
)

__all__ = [
    "KaitoFigures",
    "Preset",
    "UnknownPresetError",
    "closest_presets",
    "get_preset",
    "legacy_names",
    "list_presets",
    "preset_names",
]
