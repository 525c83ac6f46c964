"""The quantization recipe: ONE source of truth for every option of every stage — its type,
choices, range, default (device-dependent where the paper's settings do not fit a CPU), help text
and which commands take it. The CLI's options and YAML configs are both generated from it."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import DGQError
from .quant.search import METHODS

# Calibration size and phase-2 grid: the paper's on a GPU; on a 2-core CPU a small model must
# quantize in minutes (phase 2 costs grid2 GEMMs of (o x h) x (h x h) per linear).
GPU_DEFAULTS = {"nsamples": 128, "seqlen": 2048, "grid2": 80, "dtype": "float16"}
CPU_DEFAULTS = {"nsamples": 8, "seqlen": 512, "grid2": 20, "dtype": "float32"}

CALIBRATE, SMOOTH, SEARCH = "calibrate", "smooth", "search"
LOADS_MODEL = (CALIBRATE, SEARCH)  # commands that read the float model

# Named recipes (`--recipe NAME`): the fields each one sets; a config file and flags override them.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},  # the DGQ paper's method: the field defaults below
    # 'auto' rotates by a Hadamard matrix where the family allows it (RMSNorm), so these run on every family.
    "rotate-gptq": {"rotate": "auto", "gptq": True},
    # act-order measured better here (24.71 / 44.97 against 25.01 / 45.43), worse with down-o online (24.39 / 45.55)
    "rotate-capped-gptq": {"rotate": "auto", "max_column_growth": 1.0, "gptq": True, "act_order": True},
    # the most accurate DGQ recipe measured, at a run-time cost: down_proj's input rotated online
    "rotate-online-capped-gptq": {"rotate": "auto", "online_rotation": "down", "max_column_growth": 1.0, "gptq": True},
}
# What `dgq quantize` runs without --recipe / a config's `recipe:`: the best DGQ-format recipe of the
# all-windows H200 table (docs/results.md; SmolLM2-135M g64 24.71 / 44.97 against the paper's 27.34 / 51.92).
DEFAULT_PRESET = "rotate-capped-gptq"


def _option(default: Any, help: str, commands: tuple[str, ...], choices: tuple | None = None,
            low: float | None = None, high: float | None = None, open_low: bool = False) -> Any:
    """A recipe field; `low`/`high` bound numbers (`open_low`: the bound itself is not allowed)."""
    meta = {"help": help, "commands": commands, "choices": choices, "low": low, "high": high, "open_low": open_low}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Recipe:
    # The field defaults are the paper's method, hence its name here; DEFAULT_PRESET is what the CLI starts from.
    recipe: str = _option("paper", "Named recipe the other options start from: paper (the DGQ paper's method), "
                          "rotate-gptq (--rotate auto --gptq), rotate-capped-gptq (also --max-column-growth 1 --act-order), "
                          "rotate-online-capped-gptq (--rotate auto --max-column-growth 1 --gptq --online-rotation down).",
                          (CALIBRATE, SMOOTH, SEARCH), choices=tuple(PRESETS))
    scheme: str = _option("w4a8", "Quantization scheme: 4-bit weights, 8-bit activations.", (SEARCH,), choices=("w4a8",))
    calib_data: str = _option("ptb", "Calibration text: a local .txt/.json/.jsonl file, 'ptb', 'wikitext2', or a datasets name.", (CALIBRATE,))
    data_dir: str | None = _option(None, "Local data directory (else $DGQ_DATA_DIR).", (CALIBRATE,))
    nsamples: int | None = _option(None, "Calibration segments.", (CALIBRATE,), low=1, high=1_000_000)
    seqlen: int | None = _option(None, "Tokens per calibration segment.", (CALIBRATE,), low=1, high=1_000_000)
    seed: int = _option(0, "Seed of the calibration sampling (and of the rotation's signs).", (CALIBRATE,), low=0)
    rotate: str = _option("none", "Rotate the residual stream by a Hadamard matrix, folded into the float weights "
                          "before calibration (RMSNorm families; the runtime applies nothing); auto: hadamard "
                          "where the family allows it, else none.", (CALIBRATE,), choices=("none", "hadamard", "auto"))
    online_rotation: str = _option("none", "down: rotate down_proj's input by a Hadamard matrix at run time (folded "
                                   "into its weight; the checkpoint records it and every loader applies it, "
                                   "export refuses it); down-o: o_proj's input (across heads) too. On the GPU "
                                   "down_proj's rotation runs inside its activation quantizer: the rotated down "
                                   "linear takes about 1.45x the plain one at decode (H200, Llama-2-7B shape); "
                                   "a Paley-factored or over-256 block (o_proj's) runs in torch ops.",
                                   (CALIBRATE,), choices=("none", "down", "down-o"))
    dtype: str | None = _option(None, "Float dtype the model is loaded in.", (CALIBRATE,), choices=("float32", "float16", "bfloat16"))
    device: str = _option("auto", "auto | cpu | cuda[:N].", LOADS_MODEL)
    batch_size: int = _option(4, "Calibration segments per forward.", LOADS_MODEL, low=1, high=1_000_000)
    trust_remote_code: bool = _option(False, "Run model code shipped in the model directory (auto_map).", LOADS_MODEL)
    allow_pickle: bool = _option(False, "Read pickle weights (pytorch_model.bin) when a model has no safetensors.", LOADS_MODEL)
    smooth: str = _option("percentile", "Smoothing before the search.", (SMOOTH,), choices=("percentile", "smoothquant", "none"))
    percentile: float = _option(0.5, "Eq. 7 clipping percentile, in %.", (SMOOTH,), low=0, high=100, open_low=True)
    alpha: float = _option(0.5, "SmoothQuant migration strength.", (SMOOTH,), low=0, high=1)
    max_column_growth: float | None = _option(
        None, "Cap smoothing so no weight column exceeds G x the largest column max before it (percentile/smoothquant only).",
        (SMOOTH,), low=0, open_low=True)
    method: str = _option("dgq", "Weight quantizer.", (SEARCH,), choices=METHODS)
    group: int = _option(128, "Weight group size.", (SEARCH,), low=1, high=1_000_000)
    act: str = _option("dynamic", "Activation quantization: per token (dynamic) or one calibrated scale (static).", (SEARCH,),
                       choices=("dynamic", "static"))
    dynamic_above: float | None = _option(
        None, "With --act static: an input whose largest calibration token peaks above R x the mean token's abs-max "
        "(a massive activation, which one scale per tensor cannot hold) keeps per-token scales; the checkpoint "
        "records those linears (activation 'mixed'). Measured on the calibration input after rotation, before "
        "smoothing.", (SEARCH,), low=1, open_low=True)
    grid1: int = _option(20, "Phase-1 (group) clipping grid points.", (SEARCH,), low=1, high=10_000)
    grid2: int | None = _option(None, "Phase-2 (channel) clipping grid points.", (SEARCH,), low=1, high=10_000)
    objective: str = _option("xhat", "Search error on xhat (paper, int8 activations) or x (authors' code).", (SEARCH,),
                             choices=("xhat", "x"))
    refine: bool = _option(False, "DGQ phase 3 (ours): per-group floor/ceil of S2 and zp +-1.", (SEARCH,))
    gptq: bool = _option(False, "Assign codes on the searched grid by GPTQ error feedback.", (SEARCH,))
    act_order: bool = _option(False, "With --gptq: quantize the columns in order of decreasing input energy "
                              "(GPTQ's act-order, each column on its own group's searched grid); without "
                              "--gptq nothing to order.", (SEARCH,))
    symmetric: bool = _option(False, "Symmetric 4-bit codes: every zero point 8, the scales searched alone (the "
                              "compressed-tensors variant vLLM runs on Hopper at --group 128).", (SEARCH,))

    def with_overrides(self, **values: Any) -> "Recipe":
        """Copy with the options the user actually passed (None means not given)."""
        return dataclasses.replace(self, **{k: v for k, v in values.items() if v is not None})

    def resolved(self, device: str) -> tuple["Recipe", list[str]]:
        """Fill device-dependent defaults; returns the recipe and notes to show the user."""
        defaults = CPU_DEFAULTS if device == "cpu" else GPU_DEFAULTS
        filled = {key: value for key, value in defaults.items() if getattr(self, key) is None}
        notes = []
        shown = {k: v for k, v in filled.items() if k != "dtype"}
        if device == "cpu" and shown:
            notes.append("CPU run: small defaults " + ", ".join(f"--{k} {v}" for k, v in shown.items())
                         + " (the paper: 128 x 2048 tokens, 80 grid points; pass them to override)")
        recipe = dataclasses.replace(self, **filled)
        recipe.validate()
        return recipe, notes

    def validate(self) -> None:
        """Type and range of every field, so bad values fail before the first stage runs."""
        for f in fields(self):
            check_value(f, getattr(self, f.name))
        # The recipe's cap (the default's) is no user flag: say which recipe to pick instead.
        named = (f" (recipe {self.recipe} sets it; --recipe rotate-gptq or paper has none)"
                 if self.max_column_growth == PRESETS[self.recipe].get("max_column_growth") else "")
        if self.max_column_growth is not None and self.smooth == "none":
            raise DGQError(f"--max-column-growth caps smoothing, but --smooth is none{named}")
        if self.dynamic_above is not None and self.act != "static":
            raise DGQError("--dynamic-above picks the inputs that stay per token under --act static; add --act static")
        if self.max_column_growth is not None and self.act == "static":
            raise DGQError(f"--max-column-growth is for dynamic activations (with --act static it breaks the model){named}")

    def subset(self, names: tuple[str, ...]) -> dict[str, Any]:
        return {name: getattr(self, name) for name in names}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def value_type(f: dataclasses.Field) -> tuple[type, bool]:
    """(python type, whether None is allowed) from the field's annotation."""
    parts = [p.strip() for p in str(f.type).split("|")]
    return {"int": int, "float": float, "bool": bool, "str": str}[parts[0]], "None" in parts


def check_value(f: dataclasses.Field, value: Any) -> None:
    kind, optional = value_type(f)
    name, meta = flag(f.name), f.metadata
    if value is None:
        if optional:
            return
        raise DGQError(f"{name} needs a value ({kind.__name__}); got null")
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise DGQError(f"{name} must be {'true or false' if kind is bool else 'a' + ('n int' if kind is int else ' ' + kind.__name__)}; "
                       f"got {value!r}")
    if meta["choices"] is not None and value not in meta["choices"]:
        raise DGQError(f"{name} must be one of {', '.join(meta['choices'])}; got '{value}'")
    if kind in (int, float):
        if not math.isfinite(value):
            raise DGQError(f"{name} must be finite; got {value}")
        low, high = meta["low"], meta["high"]
        if (low is not None and (value < low or (meta["open_low"] and value == low))) or (high is not None and value > high):
            bound = f"{'>' if meta['open_low'] else '>='} {low}" if high is None else f"in {'(' if meta['open_low'] else '['}{low}, {high}]"
            raise DGQError(f"{name} must be {bound}; got {value}")


def _shown(name: str, value: Any) -> str | None:
    if value is None:
        return "off" if name == "max_column_growth" else None
    return str(value).lower() if isinstance(value, bool) else str(value)


def default_text(f: dataclasses.Field) -> str | None:
    """The default as help shows it: device-dependent ones with both values, those the default
    recipe sets with the paper's value too."""
    if f.name in GPU_DEFAULTS:
        return f"GPU {GPU_DEFAULTS[f.name]}, CPU {CPU_DEFAULTS[f.name]}"
    if f.name == "recipe":
        return DEFAULT_PRESET
    if f.name in PRESETS[DEFAULT_PRESET]:
        return f"{_shown(f.name, PRESETS[DEFAULT_PRESET][f.name])}; --recipe paper: {_shown(f.name, f.default)}"
    return _shown(f.name, f.default)


def options_for(command: str) -> list[dataclasses.Field]:
    return [f for f in fields(Recipe) if command in f.metadata["commands"]]


# Options that change each stage's result (and therefore its fingerprint).
CALIBRATE_OPTIONS = ("calib_data", "nsamples", "seqlen", "seed", "dtype", "rotate", "online_rotation")
SMOOTH_OPTIONS = ("smooth", "percentile", "alpha", "max_column_growth")
SEARCH_OPTIONS = ("scheme", "method", "group", "act", "dynamic_above", "grid1", "grid2", "objective", "refine", "gptq", "act_order", "symmetric")


def preset(name: str) -> Recipe:
    """The named recipe: PRESETS[name] over the field defaults."""
    check_value(next(f for f in fields(Recipe) if f.name == "recipe"), name)
    return Recipe(recipe=name, **PRESETS[name])


def load_config(path: str | None, recipe: str | None = None) -> Recipe:
    """A YAML recipe (configs/*.yaml; keys are Recipe fields, dashes or underscores) over a named
    recipe: `recipe` (--recipe), else the file's `recipe:` key, else DEFAULT_PRESET."""
    if path is None:
        return preset(recipe or DEFAULT_PRESET)
    import yaml

    file = Path(path)
    if not file.is_file():
        raise DGQError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(file.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError:
        raise DGQError(f"{path} is not a UTF-8 text file") from None
    except yaml.YAMLError as exc:
        raise DGQError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise DGQError(f"{path} must hold a mapping of options")
    known = {f.name: f for f in fields(Recipe)}
    values = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise DGQError(f"{path}: unknown options {', '.join(unknown)}")
    for name, value in values.items():
        try:
            check_value(known[name], value)
        except DGQError as exc:
            raise DGQError(f"{path}: {exc}") from None
    named = values.pop("recipe", None)
    result = dataclasses.replace(preset(recipe or named or DEFAULT_PRESET), **values)  # --recipe wins over the file's
    result.validate()
    return result
