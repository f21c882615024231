"""The offline quantizer: `quantize(model, recipe, calibration, output)` makes a TwinQuant checkpoint."""

from offline_quantizer.pipeline import CheckpointRefused, QuantizeResult, TransformNotExact, quantize
from offline_quantizer.recipe import Recipe, RecipeError, load_recipe, presets

__all__ = ["quantize", "QuantizeResult", "CheckpointRefused", "TransformNotExact", "Recipe", "RecipeError",
           "load_recipe", "presets"]
