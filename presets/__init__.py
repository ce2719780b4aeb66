"""Model presets and the GPU catalog: data plus a small interface.

Light to import (no torch): `kaiflow validate` uses it. Building weight folders for the CPU
presets lives in `presets.materialize`, which imports transformers only when called.
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
    served_model_name,
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
    "served_model_name",
]
