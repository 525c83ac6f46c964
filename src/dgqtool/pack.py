"""Write a packed checkpoint directory: config.json with a quantization_config block, one
model.safetensors (4-bit codes two per byte, int8 S2, uint8 zero points, fp16 s1, static input
scales, every other tensor as it was), the tokenizer files and a hash manifest."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import __version__
from .artifacts import claim_output_dir, make_temp_dir, read_json, sha256_file, write_json, write_tensors
from .errors import DGQError
from .models.adapters import Adapter

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CHECKPOINT_MANIFEST = "dgq_manifest.json"


def quantization_config(adapter: Adapter, fmt: str, method: str, group: int, act: str, dtype: torch.dtype) -> dict:
    return {
        "quant_method": "dgq",
        "format": fmt,
        "format_version": FORMAT_VERSION,
        "method": method,
        "bits": 4,
        "activation_bits": 8,
        "group_size": group,
        "activation": act,
        "compute_dtype": str(dtype).removeprefix("torch."),
        "quantized_linears": list(adapter.linear_names()),
        "ignore": ["lm_head", "embeddings"],
    }


def _state_without_tied(model: nn.Module) -> dict[str, torch.Tensor]:
    """safetensors stores no aliases: drop the tied output embedding (restored by tie_weights)."""
    state = model.state_dict()
    out = model.get_output_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) and out is not None:
        name = next(n for n, m in model.named_modules() if m is out)
        state.pop(f"{name}.weight", None)
    return state


def write_checkpoint(model: nn.Module, tokenizer, qconfig: dict, out: Path, force: bool) -> dict:
    """Write the packed checkpoint directory from a model whose linears are DGQ modules."""

    def contents(tmp: Path) -> dict[str, str]:
        digest = write_tensors(tmp / WEIGHTS, _state_without_tied(model), {"format": "pt"})
        config = model.config.to_dict()
        config["quantization_config"] = qconfig
        write_json(tmp / "config.json", config)
        tokenizer.save_pretrained(str(tmp))
        return {WEIGHTS: digest, "config.json": sha256_file(tmp / "config.json")}

    return write_checkpoint_dir(out, force, contents)


def write_checkpoint_dir(out: Path, force: bool, contents: Callable[[Path], dict[str, str]]) -> dict:
    """Let `contents` fill a directory next to `out` (returning file -> sha256), add the manifest
    (covering every file in it) and rename it into place, so `out` is complete or absent -- never
    half-written. An existing `out` is replaced only if dgq wrote it (and `force`)."""
    claim_output_dir(out, CHECKPOINT_MANIFEST, replace=force, protected={"the current directory": Path.cwd()})
    tmp = make_temp_dir(out)
    old = None
    try:
        files = contents(tmp)
        files.update({p.name: sha256_file(p) for p in tmp.iterdir() if p.is_file() and p.name not in files})
        manifest = {"tool_version": __version__, "files": files}
        write_json(tmp / CHECKPOINT_MANIFEST, manifest)
        if out.exists():  # empty or dgq's own (claimed above): move aside, publish, then delete
            old = make_temp_dir(out)
            out.rename(old / out.name)
        tmp.rename(out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DGQError(f"cannot write checkpoint {out}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return manifest


def read_checkpoint_config(path: Path) -> dict:
    if not path.is_dir():
        raise DGQError(f"checkpoint directory not found: {path}")
    config = read_json(path / "config.json")
    q = config.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != "dgq":
        raise DGQError(f"{path} is not a dgq checkpoint (config.json has no dgq quantization_config)")
    if q.get("format_version") != FORMAT_VERSION:
        raise DGQError(f"{path}: unsupported dgq format version {q.get('format_version')} (this tool reads {FORMAT_VERSION})")
    return config
