"""`dgq run`: generate text from a packed checkpoint through its DGQ modules, streaming tokens."""

from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import fuse_for_inference, load_checkpoint
from .resources import peak_rss_mb


@dataclass(frozen=True)
class Generation:
    text: str
    new_tokens: int
    seconds: float
    peak_memory_mb: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-9)


def prompt_ids(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    if chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    return tokenizer(prompt, return_tensors="pt").input_ids


def _peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


@torch.no_grad()
def generate(model, tokenizer, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
             chat: bool = False, stream=None, device: str = "cpu", seed: int = 0) -> Generation:
    """Greedy when temperature is 0; `stream` (a file) receives text as it is generated."""
    from transformers import TextStreamer

    torch.manual_seed(seed)
    ids = prompt_ids(tokenizer, prompt, chat).to(device)
    streamer = None
    if stream is not None:
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        streamer.on_finalized_text = lambda text, stream_end=False: print(text, end="" if not stream_end else "\n", file=stream, flush=True)
    start = time.perf_counter()
    new = _cuda_graph_generate(model, ids, max_new_tokens, temperature, streamer) if device.startswith("cuda") else None
    if new is None:
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, streamer=streamer,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **sampling)
        new = out[0, ids.shape[1]:]
    else:
        stops = (new == tokenizer.eos_token_id).nonzero()
        new = new[: int(stops[0]) + 1] if len(stops) else new
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return Generation(tokenizer.decode(new, skip_special_tokens=True), int(new.numel()), seconds, _peak_memory_mb(device))


def _pick(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    return torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1).squeeze(-1)


@torch.no_grad()
def graph_decode(model, ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, on_token=None) -> torch.Tensor:
    """Prefill, then one CUDA-graph replay per new token over a static KV cache: at batch 1 the
    launches of a few hundred small kernels per token would otherwise cost more than the kernels.
    ids (batch, n) on a CUDA device -> (batch, max_new_tokens) new token ids."""
    from transformers import StaticCache

    batch, n = ids.shape
    cache = StaticCache(config=model.config, max_cache_len=n + max_new_tokens)
    prefill = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(n, device=ids.device))
    token = _pick(prefill.logits[:, -1], temperature)
    step_ids, step_pos = token.view(batch, 1).clone(), torch.tensor([n], device=ids.device)

    def step():
        return model(input_ids=step_ids, past_key_values=cache, cache_position=step_pos).logits[:, -1]

    side = torch.cuda.Stream()  # capture wants its warm-up off the default stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # writes position n with the token it will hold anyway
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step_logits = step()
    tokens = [token]
    if on_token is not None:
        on_token(token)
    for i in range(max_new_tokens - 1):
        step_ids.copy_(token.view(batch, 1))
        step_pos.fill_(n + i)
        graph.replay()
        token = _pick(step_logits, temperature)
        tokens.append(token)
        if on_token is not None:
            on_token(token)
    return torch.stack(tokens, dim=1)


def _cuda_graph_generate(model, ids, max_new_tokens: int, temperature: float, streamer) -> torch.Tensor | None:
    """graph_decode for one prompt; None (with a warning) where the model cannot be captured."""
    if os.environ.get("DGQ_CUDA_GRAPHS", "1") == "0":
        return None
    if streamer is not None:
        streamer.put(ids.cpu())  # the prompt, which the streamer skips
    try:
        new = graph_decode(model, ids, max_new_tokens, temperature,
                           on_token=None if streamer is None else lambda t: streamer.put(t.cpu()))[0]
    except RuntimeError as exc:
        warnings.warn(f"CUDA graph decoding unavailable ({str(exc).splitlines()[0]}); using generate()")
        return None
    if streamer is not None:
        streamer.end()
    return new


def run_checkpoint(path: Path, prompt: str, *, device: str, max_new_tokens: int, temperature: float, chat: bool) -> Generation:
    model, tokenizer, _ = load_checkpoint(path, device)
    return generate(fuse_for_inference(model), tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature, chat=chat,
                    stream=sys.stdout, device=device)
