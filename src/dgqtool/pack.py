"""Write a packed checkpoint directory from a model whose linears are DGQ modules; the format
itself (tensor names, config block, manifest) lives in format.py."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .artifacts import write_json, write_tensors
from .format import CONFIG, WEIGHTS, with_guard, write_dir


def _state_without_tied(model: nn.Module) -> dict[str, torch.Tensor]:
    """safetensors stores no aliases: drop the tied output embedding (restored by tie_weights)."""
    state = model.state_dict()
    out = model.get_output_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) and out is not None:
        name = next(n for n, m in model.named_modules() if m is out)
        state.pop(f"{name}.weight", None)
    return state


def write_checkpoint(model: nn.Module, tokenizer, qconfig: dict, out: Path, force: bool) -> dict:
    """Write the packed checkpoint directory (weights, config, tokenizer, manifest); returns the manifest."""

    def contents(tmp: Path) -> dict[str, str]:
        digest = write_tensors(tmp / WEIGHTS, with_guard(_state_without_tied(model)), {"format": "pt"})
        config = model.config.to_dict()
        config["quantization_config"] = qconfig
        write_json(tmp / CONFIG, config)
        tokenizer.save_pretrained(str(tmp))
        return {WEIGHTS: digest}

    return write_dir(out, force, contents)
