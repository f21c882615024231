"""Recipes as data: what `quantize()` does to a model, as an ordered list of typed stages.

A recipe is a YAML file (or the same structure built in Python)::

    name: twinquant-w4a16
    calibration: {nsamples: 128, seqlen: 256}
    stages:
      - rotation: {kind: learned, steps: 30}
      - smoothing: {}
      - split: {rank: 4}
      - residual: {method: gptq, group_size: 64, attention_aware: true}
      - block_tuning: {epochs: 4}

Stages run in the order of `STAGE_ORDER`; each appears at most once, and `residual` (the 4-bit
quantization itself) always. Every stage is a dataclass below: unknown keys, values of the wrong
type and values outside their choices raise `RecipeError` naming the stage and the key. The
presets shipped with the package live in `recipes/*.yaml` (`load_recipe("twinquant-w4a16")`).
docs/method.md explains what each stage computes.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any

PRESET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")


class RecipeError(ValueError):
    """A recipe that cannot be run as written; the message names the stage and key."""


def _choice(*values, doc: str = ""):
    return {"choices": values, "doc": doc}


@dataclass
class Calibration:
    """How much calibration text the stages see."""

    nsamples: int = 64  # windows of `seqlen` tokens
    seqlen: int = 256
    batch_size: int = 8  # windows per forward pass
    heldout: int = 4  # further windows, from text not used for calibration, for the end-to-end check


@dataclass
class Rotation:
    """An orthogonal transform of the residual stream folded into the weights (QuaRot/SpinQuant);
    `learned`: Riemannian descent on the Stiefel manifold from a random start (docs/method.md 2)."""

    kind: str = field(default="learned", metadata=_choice("random", "learned"))
    steps: int = 50
    lr: float = 0.05


@dataclass
class Smoothing:
    """Learned positive diagonal per shared input, folded into the pre-norms and up_proj (docs/method.md 3)."""

    steps: int = 60
    lr: float = 0.02


@dataclass
class Activations:
    """Precision of the residual product's input as served, quantized per token at run time
    (format: activation_bits, activation_type). 8 with type float: FP8 e4m3 (W4A8-FP8), with type
    int: INT8; 4: 4-bit codes with an online Hadamard before o_proj/down_proj, `clip` the scale's
    clip ratio and `subspace` ResQ's 8-bit subspace of that many channels."""

    bits: int = field(default=4, metadata=_choice(4, 8, 16))
    type: str = field(default="int", metadata=_choice("int", "float"))
    clip: float = 1.0
    subspace: int = 0


@dataclass
class Split:
    """The high-precision low-rank component: W = U D + R."""

    rank: int = 16
    method: str = field(default="svd", metadata=_choice("svd", "refined"))
    refine_iters: int = 4  # method "refined": alternations of GPTQ residual and optimal low-rank refit
    weighting: str = field(default="diag", metadata=_choice("none", "diag", "hessian"))
    lowrank_dtype: str = field(default="bfloat16", metadata=_choice("bfloat16", "float16", "int8"))
    rank_overrides: dict = field(default_factory=dict)  # module name -> rank


@dataclass
class Residual:
    """The 4-bit residual: symmetric groups along the input."""

    method: str = field(default="gptq", metadata=_choice("gptq", "rtn"))
    group_size: int = field(default=128, metadata=_choice(32, 64, 128))
    attention_aware: bool = False  # v_proj's statistic mixed by the attention probabilities (docs/method.md 5)
    modules_to_not_convert: list = field(default_factory=lambda: ["lm_head"])


@dataclass
class BlockTuning:
    """Each block's scales, factors and norms tuned to reproduce the dense block (docs/method.md 4)."""

    epochs: int = 4
    lr: float = 1e-3
    loss: str = field(default="tensor", metadata=_choice("tensor", "token"))


@dataclass
class Round:
    """One round of end-to-end tuning; with several `lrs` each is tried and the lowest held-out KL
    kept; `lr_from_previous`: the rate the previous round kept."""

    epochs: int = 1
    lrs: list = field(default_factory=lambda: [1e-3])
    lr_from_previous: bool = False
    nsamples: int = 256
    batch_size: int = 4
    seed: int = 0
    code_lr: float = 0.0
    eval_every: int = 8


@dataclass
class EndToEnd:
    """Rounds of KL tuning of the whole checkpoint against the dense model (docs/method.md 6)."""

    rounds: list = field(default_factory=lambda: [Round()])


STAGES: dict[str, type] = {
    "rotation": Rotation, "smoothing": Smoothing, "activations": Activations, "split": Split,
    "residual": Residual, "block_tuning": BlockTuning, "end_to_end": EndToEnd,
}
STAGE_ORDER = tuple(STAGES)


@dataclass
class Recipe:
    name: str = "custom"
    description: str = ""
    calibration: Calibration = field(default_factory=Calibration)
    stages: list = field(default_factory=lambda: [Residual()])

    def __post_init__(self) -> None:
        names = [stage_name(s) for s in self.stages]
        if "residual" not in names:
            raise RecipeError(f"recipe {self.name!r}: no 'residual' stage (the 4-bit quantization itself)")
        for n in names:
            if names.count(n) > 1:
                raise RecipeError(f"recipe {self.name!r}: stage {n!r} appears {names.count(n)} times")
        order = [STAGE_ORDER.index(n) for n in names]
        if order != sorted(order):
            raise RecipeError(f"recipe {self.name!r}: stages {names} are out of order; they run as {list(STAGE_ORDER)}")
        _check_values(self)

    def get(self, cls: type):
        """The stage of this type, or None."""
        return next((s for s in self.stages if isinstance(s, cls)), None)

    @property
    def rank(self) -> int:
        split = self.get(Split)
        return split.rank if split else 0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description,
                "calibration": dataclasses.asdict(self.calibration),
                "stages": [{stage_name(s): _asdict(s)} for s in self.stages]}

    def replace_stage(self, stage) -> Recipe:
        """A copy with `stage` in place of the stage of its type (added, in order, if absent)."""
        stages = [s for s in self.stages if type(s) is not type(stage)] + [stage]
        stages.sort(key=lambda s: STAGE_ORDER.index(stage_name(s)))
        return Recipe(self.name, self.description, self.calibration, stages)

    def without(self, cls: type) -> Recipe:
        return Recipe(self.name, self.description, self.calibration, [s for s in self.stages if not isinstance(s, cls)])


def stage_name(stage) -> str:
    for name, cls in STAGES.items():
        if type(stage) is cls:
            return name
    raise RecipeError(f"{stage!r} is not a recipe stage; stages are {list(STAGES)}")


def _asdict(stage) -> dict:
    if isinstance(stage, EndToEnd):
        return {"rounds": [dataclasses.asdict(r) for r in stage.rounds]}
    return dataclasses.asdict(stage)


def _check_values(recipe: Recipe) -> None:
    for where, obj in [("calibration", recipe.calibration)] + [(stage_name(s), s) for s in recipe.stages]:
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            choices = f.metadata.get("choices")
            if choices and v not in choices:
                raise RecipeError(
                    f"recipe {recipe.name!r}, stage {where!r}: {f.name} = {v!r}; expected one of {list(choices)}"
                )
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
                raise RecipeError(f"recipe {recipe.name!r}, stage {where!r}: {f.name} = {v!r}; expected a value >= 0")
    cal = recipe.calibration
    if cal.nsamples < 1 or cal.seqlen < 2 or cal.batch_size < 1:
        raise RecipeError(f"recipe {recipe.name!r}, stage 'calibration': nsamples, batch_size >= 1 and seqlen >= 2 "
                          f"expected; got {dataclasses.asdict(cal)}")
    act = recipe.get(Activations)
    if act is not None:
        if not 0 < act.clip <= 1:
            raise RecipeError(
                f"recipe {recipe.name!r}, stage 'activations': clip = {act.clip!r}; expected a number in (0, 1]"
            )
        if act.bits != 4 and (act.clip != 1 or act.subspace):
            raise RecipeError(f"recipe {recipe.name!r}, stage 'activations': clip and subspace need bits 4")
        if act.type == "float" and act.bits != 8:
            raise RecipeError(f"recipe {recipe.name!r}, stage 'activations': type float (FP8 e4m3) needs bits 8")
        if act.subspace and recipe.get(Rotation) is None:
            raise RecipeError(f"recipe {recipe.name!r}, stage 'activations': subspace {act.subspace} needs a "
                              "'rotation' stage (the subspace is made by the residual-stream rotation)")
    split = recipe.get(Split)
    if split is not None:
        for name, r in split.rank_overrides.items():
            if not isinstance(r, int) or r < 0:
                raise RecipeError(f"recipe {recipe.name!r}, stage 'split': rank_overrides[{name!r}] = {r!r}; "
                                  "expected an integer >= 0")
        if split.method == "refined" and (recipe.get(Residual) or Residual()).method != "gptq":
            raise RecipeError(f"recipe {recipe.name!r}, stage 'split': method 'refined' needs residual method 'gptq' "
                              "(its residual step is GPTQ)")
    e2e = recipe.get(EndToEnd)
    if e2e is not None:
        if not e2e.rounds:
            raise RecipeError(f"recipe {recipe.name!r}, stage 'end_to_end': no rounds")
        for i, r in enumerate(e2e.rounds):
            if r.lr_from_previous == bool(r.lrs) or (r.lr_from_previous and i == 0):
                raise RecipeError(f"recipe {recipe.name!r}, stage 'end_to_end', round {i}: give either lrs or "
                                  "lr_from_previous (not in the first round)")


def _build(cls: type, values: Any, where: str):
    """cls(**values), each value checked against the field's annotation."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise RecipeError(f"{where}: expected a mapping of keys to values, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; {cls.__name__} takes {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, v in values.items():
        want = hints[key]
        if cls is EndToEnd and key == "rounds":
            if not isinstance(v, list):
                raise RecipeError(f"{where}: rounds = {v!r}; expected a list of rounds")
            v = [_build(Round, r, f"{where}, round {i}") for i, r in enumerate(v)]
        elif cls is Round and key == "lrs":
            v = v if isinstance(v, list) else [v]
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in v):
                raise RecipeError(f"{where}: lrs = {v!r}; expected positive numbers")
            v = [float(x) for x in v]
        else:
            v = _coerce(v, want, f"{where}: {key}")
        kwargs[key] = v
    return cls(**kwargs)


def _coerce(v, want, where):
    ok = {int: lambda x: isinstance(x, int) and not isinstance(x, bool),
          float: lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
          bool: lambda x: isinstance(x, bool), str: lambda x: isinstance(x, str),
          dict: lambda x: isinstance(x, dict), list: lambda x: isinstance(x, list)}
    if not ok[want](v):
        raise RecipeError(f"{where} = {v!r}; expected {want.__name__}")
    return float(v) if want is float else v


def recipe_from_dict(data: dict, source: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: expected a mapping with 'stages', got {type(data).__name__}")
    unknown = sorted(set(data) - {"name", "description", "calibration", "stages"})
    if unknown:
        raise RecipeError(f"{source}: unknown key(s) {unknown}; a recipe has name, description, calibration, stages")
    name = str(data.get("name", os.path.splitext(os.path.basename(source))[0]))
    stages = []
    raw = data.get("stages")
    if not isinstance(raw, list) or not raw:
        raise RecipeError(f"{source}: 'stages' must be a non-empty list")
    for i, item in enumerate(raw):
        if isinstance(item, str):
            item = {item: {}}
        if not isinstance(item, dict) or len(item) != 1:
            raise RecipeError(f"{source}: stage {i} = {item!r}; expected one 'name: {{key: value}}' entry")
        (sname, values), = item.items()
        if sname not in STAGES:
            raise RecipeError(f"{source}: stage {i} is {sname!r}; stages are {list(STAGES)}")
        stages.append(_build(STAGES[sname], values, f"recipe {name!r}, stage {sname!r}"))
    cal = _build(Calibration, data.get("calibration"), f"recipe {name!r}, stage 'calibration'")
    return Recipe(name=name, description=str(data.get("description", "")), calibration=cal, stages=stages)


def presets() -> list[str]:
    return sorted(os.path.splitext(f)[0] for f in os.listdir(PRESET_DIR) if f.endswith(".yaml"))


def load_recipe(recipe: str | Recipe | dict) -> Recipe:
    """A Recipe from itself, a dict, a preset name (`presets()`) or a YAML file path."""
    import yaml

    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return recipe_from_dict(recipe)
    path = recipe if os.path.exists(recipe) else os.path.join(PRESET_DIR, f"{recipe}.yaml")
    if not os.path.exists(path):
        raise RecipeError(f"recipe {recipe!r}: no such file and no such preset; presets are {presets()}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise RecipeError(f"{path}: not valid YAML ({e})") from None
    return recipe_from_dict(data, path)


def with_overrides(recipe: Recipe, overrides: dict[str, Any]) -> Recipe:
    """A copy with `stage.key = value` overrides applied (e.g. {"split.rank": 8,
    "calibration.nsamples": 128}); a stage named but absent is added with its defaults."""
    data = recipe.to_dict()
    for dotted, value in overrides.items():
        sname, _, key = dotted.partition(".")
        if not key:
            raise RecipeError(f"override {dotted!r}: expected STAGE.KEY=VALUE, e.g. split.rank=8")
        if sname == "calibration":
            data["calibration"][key] = value
            continue
        if sname not in STAGES:
            raise RecipeError(f"override {dotted!r}: stage {sname!r} is not one of {['calibration', *STAGES]}")
        entry = next((s for s in data["stages"] if sname in s), None)
        if entry is None:
            entry = {sname: {}}
            data["stages"].append(entry)
            data["stages"].sort(key=lambda s: STAGE_ORDER.index(next(iter(s))))
        entry[sname][key] = value
    return recipe_from_dict(data, f"recipe {recipe.name!r} with overrides")
