"""The packed checkpoint format, in one place: each weight format's tensors (names, dtypes, shapes)
with their encode/decode pair, the `quantization_config` block and its checks, and the checkpoint
directory (files, hash manifest, atomic write, verified read).

A checkpoint directory holds config.json (the model's config plus the block), model.safetensors,
the tokenizer files and dgq_manifest.json (the sha256 of every other file). Per quantized linear
`<prefix>`: qweight (out, in/2) uint8, two 4-bit codes per byte with input feature 2i in the low
nibble; qzeros (out, in/group) uint8 zero points; the format's scales; optionally a static input
scale input_scale (1,) float32 and a bias; where the block's rotation.online names the linear, its
online rotation online_signs (in,) float32 (+-1) and online_paley (p, p) float32: the module reads
x Q, Q = diag(online_signs) blockdiag(online_paley kron S_t) / sqrt(p t) with S_t the Sylvester
matrix of order t = the linear's sylvester_order in rotation.online (quant/rotate.py FactoredHadamard).
Everything else is stored as the model has it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from .artifacts import claim_output_dir, make_temp_dir, read_json, read_tensors, sha256_file, write_json
from .errors import DGQError
from .models.load import DTYPES
from .quant.dual_grained import DualGrainedWeight, GroupWeight, QuantizedWeight, pack_nibbles, unpack_nibbles
from .quant.rotate import paley_order_exists

FORMAT_VERSION = 1
# A checkpoint with an online rotation (readers before it refuse it, not drop it): version 2 records
# one block shape for all its linears, version 3 one per linear (down_proj and o_proj differ).
ONLINE_FORMAT_VERSION = 2
PER_LINEAR_ONLINE_VERSION = 3
READABLE_VERSIONS = (FORMAT_VERSION, ONLINE_FORMAT_VERSION, PER_LINEAR_ONLINE_VERSION)
_ORDERS = ("paley_order", "sylvester_order")
QUANT_METHOD = "dgq"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
MANIFEST = "dgq_manifest.json"
CHANNELWISE = -1  # group_size of one group per input row (GPTQ's convention)
# mixed: static except the linears in per_token_linears (full module names), which keep per-token scales
ACTIVATIONS = ("dynamic", "static", "mixed")
INPUT_SCALE = "input_scale"
ONLINE_SIGNS, ONLINE_PALEY = "online_signs", "online_paley"
SCALE_DTYPE = torch.float16  # float scales in a checkpoint; search artifacts keep float32
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class Scale:
    attr: str  # the QuantizedWeight field it stores
    dtype: torch.dtype | None  # None: a float scale, stored in the caller's float dtype
    per_group: bool  # (out, in/group), else (out,)


@dataclass(frozen=True)
class WeightFormat:
    """One packed weight format: its tensor names, and encode/decode against its QuantizedWeight."""

    name: str
    weight_type: type
    scales: dict[str, Scale]

    def names(self) -> tuple[str, ...]:
        return ("qweight", "qzeros", *self.scales)

    def empty(self, out_features: int, in_features: int, group: int, float_dtype=SCALE_DTYPE) -> dict[str, torch.Tensor]:
        """Placeholder tensors of the stored dtypes and shapes (unit scales, so never NaN)."""
        n_g = in_features // group
        tensors = {"qweight": torch.zeros(out_features, in_features // 2, dtype=torch.uint8),
                   "qzeros": torch.zeros(out_features, n_g, dtype=torch.uint8)}
        for name, s in self.scales.items():
            tensors[name] = torch.ones((out_features, n_g) if s.per_group else (out_features,), dtype=s.dtype or float_dtype)
        return tensors

    def encode(self, weight: QuantizedWeight, float_dtype=SCALE_DTYPE) -> dict[str, torch.Tensor]:
        tensors = {"qweight": pack_nibbles(weight.codes), "qzeros": weight.zero.to(torch.uint8)}
        for name, s in self.scales.items():
            tensors[name] = getattr(weight, s.attr).to(s.dtype or float_dtype)
        return tensors

    def decode(self, tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
        scales = {s.attr: tensors[name] if s.dtype else tensors[name].float() for name, s in self.scales.items()}
        return self.weight_type(unpack_nibbles(tensors["qweight"]), tensors["qzeros"], **scales)


WEIGHT_FORMATS = {
    "dgq": WeightFormat("dgq", DualGrainedWeight, {"scales_s2": Scale("s2", torch.int8, True),
                                                   "scales_s1": Scale("s1", None, False)}),
    "w4-group": WeightFormat("w4-group", GroupWeight, {"scales": Scale("scale", None, True)}),
}
PACKED_NAMES = frozenset(n for f in WEIGHT_FORMATS.values() for n in f.names()) | {INPUT_SCALE, ONLINE_SIGNS, ONLINE_PALEY}


def format_of(weight: QuantizedWeight) -> str:
    return next(name for name, f in WEIGHT_FORMATS.items() if isinstance(weight, f.weight_type))


def linear_tensors(prefix: str, weight: QuantizedWeight, float_dtype=SCALE_DTYPE) -> dict[str, torch.Tensor]:
    """One linear's packed tensors under `<prefix>.<name>` (checkpoints and search artifacts alike)."""
    return {f"{prefix}.{k}": v for k, v in WEIGHT_FORMATS[format_of(weight)].encode(weight, float_dtype).items()}


def linear_weight(prefix: str, tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
    """Inverse of linear_tensors; the format is the one whose scales are present."""
    fmt = next((f for f in WEIGHT_FORMATS.values() if all(f"{prefix}.{n}" in tensors for n in f.scales)),
               WEIGHT_FORMATS["dgq"])
    missing = [f"{prefix}.{n}" for n in fmt.names() if f"{prefix}.{n}" not in tensors]
    if missing:
        raise DGQError(f"packed tensors lack {missing[0]}")
    return fmt.decode({n: tensors[f"{prefix}.{n}"] for n in fmt.names()})


def split_linears(state: dict[str, torch.Tensor]) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor]]:
    """(prefix -> packed weight of every quantized linear, the remaining tensors)."""
    prefixes = [k.removesuffix(".qweight") for k in state if k.endswith(".qweight")]
    weights = {p: linear_weight(p, state) for p in prefixes}
    owned = {f"{p}.{n}" for p, w in weights.items() for n in WEIGHT_FORMATS[format_of(w)].names()}
    return weights, {k: v for k, v in state.items() if k not in owned}


def guard_key(state: dict) -> str:
    """Where the guard goes: the first quantized linear's `weight`."""
    return next(k for k in state if k.endswith(".qweight")).removesuffix("qweight") + "weight"


def with_guard(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add an empty tensor under the float weight name of one quantized linear. transformers without
    dgqtool imported skips the unknown quant_method and would silently leave every quantized linear
    random; a size mismatch is an error there, so it stops instead. dgq's loaders drop it."""
    return state | {guard_key(state): torch.zeros(0, dtype=torch.uint8)}


def without_guard(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not (k.endswith(".weight") and k.removesuffix("weight") + "qweight" in state)}


# ----------------------------------------------------------------------------------- config block


def quantization_config(adapter, fmt: str, method: str, group: int, act: str, dtype: torch.dtype,
                        per_token: list[str] | None = None) -> dict:
    """act one of ACTIVATIONS; per_token: under 'mixed', the linears (full module names) that kept
    per-token scales."""
    mixed = {"per_token_linears": sorted(per_token)} if act == "mixed" else {}
    return {
        "quant_method": QUANT_METHOD,
        "format": fmt,
        "format_version": FORMAT_VERSION,
        "method": method,
        "bits": 4,
        "activation_bits": 8,
        "group_size": CHANNELWISE if method == "channelwise" else group,
        "activation": act,
        "compute_dtype": str(dtype).removeprefix("torch."),
        "quantized_linears": list(adapter.linear_names()),
        "ignore": [*adapter.ignore, "embeddings"],
    } | mixed


def config_problems(config: dict) -> list[str]:
    """Everything wrong with a checkpoint's config.json as a dgq checkpoint; empty when it is valid."""
    q = config.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != QUANT_METHOD:
        return ["config.json has no dgq quantization_config (not a dgq checkpoint)"]
    if q.get("format_version") not in READABLE_VERSIONS:
        return [f"unsupported dgq format version {q.get('format_version')} "
                f"(this tool reads {', '.join(map(str, READABLE_VERSIONS))})"]
    group = q.get("group_size")
    checks = [
        (isinstance(config.get("model_type"), str) and config["model_type"], "config.json has no model_type"),
        (q.get("format") in WEIGHT_FORMATS, f"unknown dgq weight format '{q.get('format')}'"),
        (q.get("bits") == 4, f"bits must be 4, got {q.get('bits')!r}"),
        (q.get("activation_bits") == 8, f"activation_bits must be 8, got {q.get('activation_bits')!r}"),
        (type(group) is int and (group > 0 or group == CHANNELWISE),
         f"group_size must be a positive integer (or {CHANNELWISE} for channel-wise), got {group!r}"),
        (q.get("activation") in ACTIVATIONS, f"activation must be one of {', '.join(ACTIVATIONS)}, got {q.get('activation')!r}"),
        (q.get("compute_dtype") in DTYPES, f"compute_dtype must be one of {', '.join(DTYPES)}, got {q.get('compute_dtype')!r}"),
    ]
    return [message for ok, message in checks if not ok] + _per_token_problems(q) + _online_problems(q)


def _per_token_problems(q: dict) -> list[str]:
    names = q.get("per_token_linears")
    if q.get("activation") != "mixed":
        return [] if names is None else [f"per_token_linears is only for activation 'mixed', got {q.get('activation')!r}"]
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        return [f"activation 'mixed' needs per_token_linears, a non-empty list of linear names, got {names!r}"]
    return []


def static_input(q: dict):
    """name (full module name) -> whether that linear's input has a static scale, from a checked config."""
    per_token = frozenset(q.get("per_token_linears", ()))
    return lambda name: q["activation"] == "static" or (q["activation"] == "mixed" and name not in per_token)


def _online_problems(q: dict) -> list[str]:
    rotation = q.get("rotation", {})
    if not isinstance(rotation, dict):
        return [f"rotation must be an object, got {rotation!r}"]
    online = rotation.get("online", "none")
    if online == "none":
        return []
    version = q.get("format_version")
    if version not in (ONLINE_FORMAT_VERSION, PER_LINEAR_ONLINE_VERSION):
        return [f"rotation.online needs format_version {ONLINE_FORMAT_VERSION} or {PER_LINEAR_ONLINE_VERSION}, got {version!r}"]
    linears = online.get("linears") if isinstance(online, dict) else None
    orders_ok = lambda record: isinstance(record, dict) and all(type(record.get(k)) is int and record[k] > 0 for k in _ORDERS)
    if version == ONLINE_FORMAT_VERSION:
        shape = "{linears: [names], paley_order, sylvester_order}"
        fields_ok = (isinstance(linears, list) and linears and all(isinstance(n, str) for n in linears) and orders_ok(online))
        records = {name: online for name in linears} if fields_ok else {}
    else:
        shape = "{linears: {name: {paley_order, sylvester_order}}}"
        fields_ok = isinstance(linears, dict) and linears and all(orders_ok(r) for r in linears.values())
        records = linears if fields_ok else {}
    if not fields_ok:
        return [f"rotation.online must be 'none' or {shape} at format_version {version}, got {online!r}"]
    problems = []
    for name, record in sorted(records.items()):
        p, t = record["paley_order"], record["sylvester_order"]
        if t & (t - 1):
            problems.append(f"rotation.online: {name}'s sylvester_order must be a power of two, got {t}")
        elif p != 1 and not paley_order_exists(p):
            problems.append(f"rotation.online: {name}'s paley_order {p} has no Paley construction")
    return problems


def with_rotation(q: dict, kind: str, seed: int, online: dict[str, tuple[int, int]]) -> dict:
    """The config block with its rotation record: the residual rotation `kind` (folded into the
    stored weights: loaders apply nothing for it) and the online one, linear name -> (Paley order,
    Sylvester order) as online_rotations returns it: format version 2 where all share one block
    shape (one record for them), 3 where they differ (one record per linear)."""
    orders = set(online.values())
    record: str | dict = "none"
    version = {}
    if len(orders) == 1:
        (paley, sylvester), = orders
        record = {"linears": sorted(online), "paley_order": paley, "sylvester_order": sylvester}
        version = {"format_version": ONLINE_FORMAT_VERSION}
    elif orders:
        record = {"linears": {name: dict(zip(_ORDERS, online[name])) for name in sorted(online)}}
        version = {"format_version": PER_LINEAR_ONLINE_VERSION}
    return q | version | {"rotation": {"kind": kind, "seed": seed, "online": record}}


def online_rotations(q: dict) -> dict[str, tuple[int, int]]:
    """Linear name (within a layer) -> (Paley order, Sylvester order) of its online rotation, from a
    checked quantization_config; empty when the checkpoint has none."""
    online = q.get("rotation", {}).get("online", "none")
    if online == "none":
        return {}
    linears = online["linears"]
    records = linears if isinstance(linears, dict) else {name: online for name in linears}
    return {name: (r["paley_order"], r["sylvester_order"]) for name, r in records.items()}


def group_of(q: dict, in_features: int, where: str) -> int:
    """The group size of a linear with `in_features` inputs, checked against it."""
    group = in_features if q["group_size"] == CHANNELWISE else q["group_size"]
    if in_features % group or in_features % 2:
        raise DGQError(f"{where}: group_size {group} does not divide in_features {in_features}")
    return group


# ----------------------------------------------------------------------------------- directory


def read_config(path: Path) -> dict:
    """config.json of a dgq checkpoint directory, checked; one clear error otherwise."""
    if not path.is_dir():
        raise DGQError(f"checkpoint directory not found: {path}")
    config = read_json(path / CONFIG)
    problems = config_problems(config)
    if problems:
        raise DGQError(f"{path}: {problems[0]}")
    return config


def check_files(path: Path) -> None:
    """The manifest covers every file in the directory and every file matches its hash."""
    files = read_json(path / MANIFEST).get("files")
    if not isinstance(files, dict) or WEIGHTS not in files:
        raise DGQError(f"{path}: {MANIFEST} lists no {WEIGHTS}")
    present = {p.name for p in path.iterdir() if p.name != MANIFEST}
    if present - set(files):
        raise DGQError(f"{path}: {sorted(present - set(files))[0]} is not covered by {MANIFEST}")
    if set(files) - present:
        raise DGQError(f"{path}: {sorted(set(files) - present)[0]} is missing (listed in {MANIFEST})")
    for name, digest in sorted(files.items()):
        if sha256_file(path / name) != digest:
            raise DGQError(f"{path}: {name} does not match the hash in {MANIFEST} (edited or corrupt)")
    if not any(name in files for name in TOKENIZER_FILES):
        raise DGQError(f"{path}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)})")


def checked_config(path: Path) -> dict:
    """config.json of a dgq checkpoint whose fields and files all check out."""
    config = read_config(path)
    check_files(path)
    return config


_SAFETENSORS_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool,
                      "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def tensor_header(path: Path) -> dict[str, tuple[torch.dtype | str, tuple[int, ...]]]:
    """name -> (dtype, shape) of every tensor in a safetensors file, from its header alone."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}
            return {k: (_SAFETENSORS_DTYPES.get(s.get_dtype(), s.get_dtype()), tuple(s.get_shape())) for k, s in slices.items()}
    except (SafetensorError, OSError) as exc:
        raise DGQError(f"{path} is not a valid safetensors file: {exc}") from None


def read_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, tensors) of a dgq checkpoint, every file checked against the manifest."""
    config = checked_config(path)
    return config, without_guard(read_tensors(path / WEIGHTS))


def write_dir(out: Path, force: bool, contents: Callable[[Path], dict[str, str]]) -> dict:
    """Let `contents` fill a directory next to `out` (returning the sha256 of files it already
    hashed), add the manifest (covering every file in it) and rename it into place, so `out` is
    complete or absent -- never half-written. An existing `out` is replaced only if dgq wrote it
    (and `force`)."""
    claim_output_dir(out, MANIFEST, replace=force, protected={"the current directory": Path.cwd()})
    tmp = make_temp_dir(out)
    old = None
    try:
        files = contents(tmp)
        files.update({p.name: sha256_file(p) for p in tmp.iterdir() if p.is_file() and p.name not in files})
        manifest = {"tool_version": __version__, "files": files}
        write_json(tmp / MANIFEST, manifest)
        if out.exists():  # empty or dgq's own (claimed above): move aside, publish, then delete
            old = make_temp_dir(out)
            out.rename(old / out.name)
        tmp.rename(out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            (old / out.name).rename(out)  # the previous checkpoint stays where it was
        if isinstance(exc, OSError):
            raise DGQError(f"cannot write checkpoint {out}: {exc.strerror or exc}") from None
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return manifest
