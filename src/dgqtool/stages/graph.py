"""What every stage shares: the run context, device choice, and the stage opening (read the
upstream manifests, decide from options + input fingerprints whether the stage is up to date)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..artifacts import is_finished, read_manifest
from ..errors import DGQError
from ..models.adapters import InputGroup
from ..progress import Reporter
from ..recipe import Recipe

STAGES = ("calibrate", "smooth", "search", "pack")


def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise DGQError(f"--device {requested} requested but no CUDA GPU is available")
    if not (requested == "cpu" or requested.startswith("cuda")):
        raise DGQError(f"--device must be auto, cpu or cuda[:N]; got '{requested}'")
    return requested


def input_key(layer_index: int, group: InputGroup) -> str:
    """Statistics of one activation are stored under the first linear that reads it."""
    return f"{layer_index}.{group.linears[0]}"


@dataclass
class Context:
    """What every stage needs: the work directory, the resolved recipe, where output goes."""

    work: Path
    recipe: Recipe
    device: str
    reporter: Reporter
    force: bool = False

    def stage_dir(self, stage: str) -> Path:
        return self.work / stage

    def manifest(self, stage: str) -> dict:
        return read_manifest(self.stage_dir(stage), stage)

    def open(self, stage: str, options: dict, upstream: tuple[str, ...] = (), inputs: dict[str, str] | None = None):
        """The common opening of a stage. Returns (manifest if already up to date else None,
        the input fingerprints, the upstream manifests by name)."""
        manifests = {name: self.manifest(name) for name in upstream}
        inputs = {**(inputs or {}), **{name: m["fingerprint"] for name, m in manifests.items()}}
        if self.force or not is_finished(self.stage_dir(stage), stage, options, inputs):
            return None, inputs, manifests
        self.reporter.info(f"{stage}: up to date, skipped")
        return self.manifest(stage), inputs, manifests
