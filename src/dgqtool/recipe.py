"""The quantization recipe: every option of every stage, with defaults, validation and YAML configs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import DGQError
from .quant.search import METHODS

# Calibration size and phase-2 grid: the paper's on a GPU; on a 2-core CPU a small model must
# quantize in minutes (phase 2 costs grid2 GEMMs of (o x h) x (h x h) per linear).
GPU_DEFAULTS = {"nsamples": 128, "seqlen": 2048, "grid2": 80}
CPU_DEFAULTS = {"nsamples": 8, "seqlen": 512, "grid2": 20}

CHOICES = {
    "smooth": ("percentile", "smoothquant", "none"),
    "method": METHODS,
    "act": ("dynamic", "static"),
    "objective": ("xhat", "x"),
    "dtype": ("float32", "float16", "bfloat16"),
}


@dataclass
class Recipe:
    calib_data: str = "ptb"
    data_dir: str | None = None
    nsamples: int | None = None
    seqlen: int | None = None
    seed: int = 0
    dtype: str | None = None
    device: str = "auto"
    batch_size: int = 4
    trust_remote_code: bool = False
    smooth: str = "percentile"
    percentile: float = 0.5
    alpha: float = 0.5
    max_column_growth: float | None = None
    method: str = "dgq"
    group: int = 128
    act: str = "dynamic"
    grid1: int = 20
    grid2: int | None = None
    objective: str = "xhat"
    refine: bool = False
    gptq: bool = False

    def with_overrides(self, **values: Any) -> "Recipe":
        """Copy with the options the user actually passed (None means not given)."""
        return dataclasses.replace(self, **{k: v for k, v in values.items() if v is not None})

    def resolved(self, device: str) -> tuple["Recipe", list[str]]:
        """Fill device-dependent defaults; returns the recipe and notes to show the user."""
        notes = []
        defaults = CPU_DEFAULTS if device == "cpu" else GPU_DEFAULTS
        filled = {}
        for key, value in defaults.items():
            if getattr(self, key) is None:
                filled[key] = value
        if device == "cpu" and filled:
            notes.append(
                "CPU run: small defaults "
                + ", ".join(f"--{k} {v}" for k, v in filled.items())
                + " (the paper: 128 x 2048 tokens, 80 grid points; pass them to override)"
            )
        if self.dtype is None:
            filled["dtype"] = "float32" if device == "cpu" else "float16"
        recipe = dataclasses.replace(self, **filled)
        recipe.validate()
        return recipe, notes

    def validate(self) -> None:
        for key, allowed in CHOICES.items():
            value = getattr(self, key)
            if value is not None and value not in allowed:
                raise DGQError(f"--{key.replace('_', '-')} must be one of {', '.join(allowed)}; got '{value}'")
        positive = {"nsamples": self.nsamples, "seqlen": self.seqlen, "batch_size": self.batch_size,
                    "group": self.group, "grid1": self.grid1, "grid2": self.grid2}
        for key, value in positive.items():
            if value is not None and not 0 < value <= 1_000_000:
                raise DGQError(f"--{key.replace('_', '-')} must be a positive integer (got {value})")
        if not 0 < self.percentile < 100:
            raise DGQError(f"--percentile must be in (0, 100); got {self.percentile}")
        if not 0 <= self.alpha <= 1:
            raise DGQError(f"--alpha must be in [0, 1]; got {self.alpha}")
        if self.max_column_growth is not None and not self.max_column_growth > 0:
            raise DGQError(f"--max-column-growth must be positive; got {self.max_column_growth}")

    def subset(self, names: tuple[str, ...]) -> dict[str, Any]:
        return {name: getattr(self, name) for name in names}


# Options that change each stage's result (and therefore its fingerprint).
CALIBRATE_OPTIONS = ("calib_data", "nsamples", "seqlen", "seed", "dtype")
SMOOTH_OPTIONS = ("smooth", "percentile", "alpha", "max_column_growth")
SEARCH_OPTIONS = ("method", "group", "act", "grid1", "grid2", "objective", "refine", "gptq")


def load_config(path: str | None) -> Recipe:
    """A YAML recipe (configs/*.yaml): keys are Recipe fields, dashes or underscores."""
    if path is None:
        return Recipe()
    import yaml

    file = Path(path)
    if not file.is_file():
        raise DGQError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DGQError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise DGQError(f"{path} must hold a mapping of options")
    known = {f.name for f in fields(Recipe)}
    values = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise DGQError(f"{path}: unknown options {', '.join(unknown)}")
    recipe = Recipe(**values)
    recipe.validate()
    return recipe
