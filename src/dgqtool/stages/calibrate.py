"""calibrate: sample calibration windows, run the float model layer by layer and record each
linear input's per-channel maxima (and the weights' column maxima smoothing needs)."""

from __future__ import annotations

import torch
from torch import nn

from ..artifacts import write_manifest, write_tensors
from ..calib.capture import run_layers
from ..calib.windows import sample_segments
from ..corpora import load_corpus, tokenize
from ..errors import DGQError
from ..fingerprints import text_digest
from ..models.adapters import Adapter, adapter_for_model, can_fold, check_group_size, decoder_layers
from ..models.rotation import online_rotation_of, resolve_rotation, rotate_model, rotate_online
from ..models.load import canonical_spec, check_context_length, load_model, model_digest
from ..recipe import CALIBRATE_OPTIONS
from ..resources import Usage
from .graph import Context, input_key


STATISTICS = "channel abs-max, weight column abs-max, token abs-max mean"


class _ChannelMaxima:
    """Hooks recording max |x| per input channel of every input group, and the sum (float64, on the
    activations' device) and count of the tokens' abs-maxima (how far the largest token stands out),
    rejecting NaN/inf."""

    def __init__(self, adapter: Adapter, stats: dict[str, torch.Tensor]):
        self.adapter, self.stats = adapter, stats
        self.token_sums: dict[str, tuple[torch.Tensor, int]] = {}

    def attach(self, index: int, layer: nn.Module) -> list:
        handles = []
        for group in self.adapter.inputs:
            key = input_key(index, group)

            def hook(module, args, key=key):
                x = args[0].detach()
                if not torch.isfinite(x).all():
                    raise DGQError(f"non-finite calibration activations at the input of layer {key}")
                rows = x.reshape(-1, x.shape[-1]).abs()
                m = rows.amax(0).float().cpu()
                self.stats[key] = m if key not in self.stats else torch.maximum(self.stats[key], m)
                total, count = self.token_sums.get(key, (0, 0))
                self.token_sums[key] = (rows.amax(1).double().sum() + total, count + rows.shape[0])

            handles.append(layer.get_submodule(group.linears[0]).register_forward_pre_hook(hook))
        return handles

    def finish(self, index: int, layer: nn.Module) -> bool:
        return False


def calibrate(ctx: Context, model_spec: str, planned_group: int | None = None) -> dict:
    """planned_group: the group size the later search will use (quantize knows it), checked here
    against the model so a misfit fails before the expensive stages run."""
    r = ctx.recipe
    model_spec = canonical_spec(model_spec)
    digest = model_digest(model_spec)
    text = load_corpus(r.calib_data, "train", r.data_dir)
    # what the statistics hold: a cached run without the token means is not reused
    inputs = {"model": digest, "calib_text": text_digest(text), "statistics": STATISTICS}
    options = {"model": model_spec, **r.subset(CALIBRATE_OPTIONS)}
    done, inputs, _ = ctx.open("calibrate", options, inputs=inputs)
    if done is not None:
        return done
    usage = Usage()
    model, tokenizer, source = load_model(model_spec, r.dtype, r.trust_remote_code, r.allow_pickle)
    adapter = adapter_for_model(model)
    rotation = resolve_rotation(r.rotate, adapter)
    if rotation != r.rotate and rotation == "none":
        ctx.reporter.info(f"--rotate auto: {model.config.model_type} has no RMSNorm residual stream to rotate; not rotating")
    rotate_model(model, adapter, rotation, r.seed, device=ctx.device)
    rotate_online(model, adapter, r.online_rotation, r.seed)
    tokens = sample_segments(tokenize(tokenizer, text), r.nsamples, r.seqlen, r.seed)
    check_context_length(model, r.seqlen)
    if planned_group is not None:
        check_group_size(model, adapter, planned_group)
    stats: dict[str, torch.Tensor] = {}
    layers = decoder_layers(model, adapter)
    foldable = []
    for index, layer in enumerate(layers):
        for group in adapter.inputs:
            key = input_key(index, group)
            columns = torch.stack([layer.get_submodule(n).weight.detach().abs().amax(0) for n in group.linears])
            stats[f"{key}.weight_absmax"] = columns.amax(0).float()
            # an online rotation sits between the producer and the linear: nothing to fold into
            if can_fold(layer, group) and online_rotation_of(layer.get_submodule(group.linears[0])) is None:
                foldable.append(key)
    maxima: dict[str, torch.Tensor] = {}
    capture = _ChannelMaxima(adapter, maxima)
    with ctx.reporter.task(f"calibrate {len(tokens)}x{tokens.shape[1]} tokens", len(layers)) as step:
        routed = run_layers(model, adapter, tokens, capture, ctx.device, r.batch_size,
                            on_layer=lambda i: step.advance(f"calibrate (layer {i + 1}/{len(layers)})"))
    if routed:
        idle = sum(c == 0 for counts in routed.values() for c in counts)
        ctx.reporter.info(f"calibrate: {idle} of {sum(map(len, routed.values()))} experts got no routed tokens; "
                          "every expert's statistics use all tokens (all-expert capture)")
    stats.update({f"{k}.act_absmax": v for k, v in maxima.items()})
    stats.update({f"{k}.token_absmax_mean": (total.cpu() / count).float().reshape(1)
                  for k, (total, count) in capture.token_sums.items()})
    digest = write_tensors(ctx.stage_dir("calibrate") / "stats.safetensors", {"tokens": tokens, **stats})
    return write_manifest(
        ctx.stage_dir("calibrate"), "calibrate", options, inputs, {"stats.safetensors": digest},
        model_type=model.config.model_type, source=source.describe(), rotation=rotation, foldable=foldable,
        num_layers=len(layers), expert_tokens=routed, resources=usage.snapshot(),
    )
