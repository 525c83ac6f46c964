"""`dgq run`: generate text from a packed checkpoint through its DGQ modules, streaming tokens."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import load_checkpoint
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
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, streamer=streamer,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **sampling)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:]
    return Generation(tokenizer.decode(new, skip_special_tokens=True), int(new.numel()), seconds, _peak_memory_mb(device))


def run_checkpoint(path: Path, prompt: str, *, device: str, max_new_tokens: int, temperature: float, chat: bool) -> Generation:
    model, tokenizer, _ = load_checkpoint(path, device)
    return generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature, chat=chat,
                    stream=sys.stdout, device=device)
