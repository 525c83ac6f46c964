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
    """One timed generation, after an untimed warm-up (kernel build and load, allocator): the time
    to the first new token (prefill) and the decode rate over tokens 3..n, since the step to the
    second token also holds one-time work (the CUDA graph capture), as llama.cpp and vLLM split it."""

    text: str
    new_tokens: int
    first_token_seconds: float
    decode_seconds: float  # from the second new token to the last
    peak_memory_mb: float

    @property
    def decode_tokens_per_second(self) -> float | None:
        return (self.new_tokens - 2) / max(self.decode_seconds, 1e-9) if self.new_tokens > 2 else None

    def summary(self) -> str:
        rate = self.decode_tokens_per_second
        decode = "too few tokens to time decode" if rate is None else f"decode {rate:.1f} tokens/s"
        return (f"{self.new_tokens} tokens: first token after {self.first_token_seconds * 1e3:.0f} ms, {decode} "
                f"(warm-up excluded), peak memory {self.peak_memory_mb:.0f} MiB")


class _TokenClock:
    """A generate() streamer that stamps every new token (the first put is the prompt) and passes
    everything on to a text streamer, if there is one, up to the first of the `stop` tokens: the CUDA graph
    decoder runs its steps past an end-of-sequence token, and what follows it is not the answer."""

    def __init__(self, inner=None, stop: frozenset[int] = frozenset()):
        self.inner, self.stop = inner, stop
        self.restart()

    def restart(self) -> None:
        """Forget the stamps (generation starts over; the text streamer may repeat the first token)."""
        self.times, self._prompt_seen, self._stopped = [], False, False

    def put(self, value) -> None:
        if self._stopped:
            return
        if self._prompt_seen:
            self.times.append(time.perf_counter())
            self._stopped = value.numel() == 1 and int(value) in self.stop
        self._prompt_seen = True
        if self.inner is not None:
            self.inner.put(value)

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()


def end_tokens(model, tokenizer) -> frozenset[int]:
    """Every end-of-sequence id: the tokenizer's and the generation config's (a list for Llama 3)."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return frozenset(ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []))


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
             chat: bool = False, stream=None, device: str = "cpu", seed: int = 0, compile: bool = True) -> Generation:
    """Greedy when temperature is 0; `stream` (a file) receives text as it is generated. On CUDA
    the decode step runs compiled (compile_step) unless `compile` is False; elsewhere eager."""
    from transformers import TextStreamer

    ids = prompt_ids(tokenizer, prompt, chat).to(device)
    step_model = compile_step(model) if compile and device.startswith("cuda") else None
    cache_len = ids.shape[1] + max_new_tokens  # the warm-up compiles for the timed run's cache shape
    _decode(model, tokenizer, ids, min(2, max_new_tokens), temperature, _TokenClock(), device, step_model, cache_len)
    torch.manual_seed(seed)
    text_streamer = None
    if stream is not None:
        text_streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        text_streamer.on_finalized_text = lambda text, stream_end=False: print(text, end="" if not stream_end else "\n", file=stream, flush=True)
    clock = _TokenClock(text_streamer, end_tokens(model, tokenizer))
    start = time.perf_counter()
    new = _decode(model, tokenizer, ids, max_new_tokens, temperature, clock, device, step_model, cache_len)
    times = clock.times[: new.numel()]  # the graph decoder runs past an end-of-sequence token
    return Generation(tokenizer.decode(new, skip_special_tokens=True), int(new.numel()), times[0] - start,
                      times[-1] - times[1] if len(times) > 2 else 0.0, _peak_memory_mb(device))


def _decode(model, tokenizer, ids, max_new_tokens: int, temperature: float, clock: _TokenClock, device: str,
            step_model=None, cache_len: int | None = None) -> torch.Tensor:
    """The new token ids, each stamped by `clock` as it comes out."""
    new = None
    if device.startswith("cuda"):
        new = _cuda_graph_generate(model, ids, max_new_tokens, temperature, clock, step_model, cache_len)
    if new is None:
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, streamer=clock,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **sampling)
        return out[0, ids.shape[1]:]
    stops = torch.isin(new, torch.tensor(sorted(end_tokens(model, tokenizer)), device=new.device)).nonzero()
    return new[: int(stops[0]) + 1] if len(stops) else new


def _pick(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    return torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1).squeeze(-1)


def compile_step(model):
    """The model compiled for graph_decode's decode step: inductor in its default mode, whole graph
    (the DGQ linears are one opaque op each). Not mode="reduce-overhead": its own CUDA graphs would
    nest inside graph_decode's capture, which already replays the compiled kernels as one graph;
    what compiling adds is the fusion of the float ops between the linears (norms, rotary, SiLU,
    residuals). Automatic dynamic shapes: one recompile for a second batch size or cache length."""
    return torch.compile(model, fullgraph=True)


@torch.no_grad()
def graph_decode(model, ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, on_token=None,
                 step_model=None, cache_len: int | None = None) -> torch.Tensor:
    """Prefill, then one CUDA-graph replay per new token over a static KV cache: at batch 1 the
    launches of a few hundred small kernels per token would otherwise cost more than the kernels.
    ids (batch, n) on a CUDA device -> (batch, max_new_tokens) new token ids. The decode step runs
    `step_model` (compile_step(model); default the model itself) and is compiled, if at all, in the
    warm-up step before the capture; the prefill stays eager. cache_len (default n + max_new_tokens)
    lets a short warm-up share the timed run's cache shape, hence its compiled graph."""
    from transformers import StaticCache

    batch, n = ids.shape
    cache = StaticCache(config=model.config, max_cache_len=cache_len or n + max_new_tokens)
    prefill = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(n, device=ids.device))
    token = _pick(prefill.logits[:, -1], temperature)
    tokens = [token]
    if on_token is not None:
        on_token(token)  # before the capture below: the first token's time is the prefill's
    step_ids, step_pos = token.view(batch, 1).clone(), torch.tensor([n], device=ids.device)
    forward = model if step_model is None else step_model

    def step():
        return forward(input_ids=step_ids, past_key_values=cache, cache_position=step_pos).logits[:, -1]

    side = torch.cuda.Stream()  # capture wants its warm-up off the default stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # writes position n with the token it will hold anyway
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step_logits = step()
    for i in range(max_new_tokens - 1):
        step_ids.copy_(token.view(batch, 1))
        step_pos.fill_(n + i)
        graph.replay()
        token = _pick(step_logits, temperature)
        tokens.append(token)
        if on_token is not None:
            on_token(token)
    return torch.stack(tokens, dim=1)


def _cuda_graph_generate(model, ids, max_new_tokens: int, temperature: float, streamer, step_model=None,
                         cache_len: int | None = None) -> torch.Tensor | None:
    """graph_decode for one prompt; None (with a warning) where the model cannot be captured."""
    if os.environ.get("DGQ_CUDA_GRAPHS", "1") == "0":
        return None
    streamer.put(ids.cpu())  # the prompt, which the streamer skips
    try:  # .cpu() waits for each token, so the streamer stamps it when it exists
        new = graph_decode(model, ids, max_new_tokens, temperature, on_token=lambda t: streamer.put(t.cpu()),
                           step_model=step_model, cache_len=cache_len)[0]
    except RuntimeError as exc:
        warnings.warn(f"CUDA graph decoding unavailable ({str(exc).splitlines()[0]}); using generate()")
        streamer.restart()
        return None
    streamer.end()
    return new


def run_checkpoint(path: Path, prompt: str, *, device: str, max_new_tokens: int, temperature: float, chat: bool,
                   compile: bool = True) -> Generation:
    model, tokenizer, _ = load_checkpoint(path, device)
    return generate(fuse_for_inference(model), tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature, chat=chat,
                    stream=sys.stdout, device=device, compile=compile)
