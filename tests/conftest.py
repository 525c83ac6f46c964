"""Tiny models built in code (no downloads), a trained-in-place tokenizer, and real-asset locations."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "assets" / "data"
CORPUS = "\n".join(
    f"the {a} {b} of the {c} is {d} and {e} were seen near the {f} in {n} ."
    for n, (a, b, c, d, e, f) in enumerate(
        zip(*[["red", "old", "new", "big", "small", "quick", "lazy", "bright"] * 40] * 2,
            ["house", "river", "market", "city", "garden", "road", "field", "hill"] * 40,
            ["open", "closed", "busy", "quiet", "large", "empty", "full", "green"] * 40,
            ["birds", "people", "horses", "trains", "boats", "cars", "dogs", "cats"] * 40,
            ["bridge", "tower", "station", "school", "church", "harbour", "farm", "mill"] * 40)
    )
)


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run the slow tests on the real model")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow") or os.environ.get("DGQ_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: opt in with --run-slow or DGQ_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text(CORPUS)
    return path


def make_tokenizer(text: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _add_outliers(model, norm_names: tuple[str, ...]):
    """Real LLMs have a few activation channels 10-100x larger than the rest; mimic that."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.split(".")[-1] in norm_names:
                idx = torch.randperm(module.weight.numel(), generator=gen)[:2]
                module.weight[idx] *= 30.0


def build_tiny(kind: str, path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    tokenizer = make_tokenizer(CORPUS)
    vocab = len(tokenizer)
    if kind == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             tie_word_embeddings=True)
        model = LlamaForCausalLM(config)
        _add_outliers(model, ("input_layernorm", "post_attention_layernorm"))
    else:
        config = OPTConfig(vocab_size=vocab, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=256, word_embed_proj_dim=64)
        model = OPTForCausalLM(config)
        _add_outliers(model, ("self_attn_layer_norm", "final_layer_norm"))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_opt(tmp_path_factory) -> Path:
    return build_tiny("opt", tmp_path_factory.mktemp("tiny-opt"))


@pytest.fixture(params=["tiny_llama", "tiny_opt"])
def tiny_model(request):
    """Each tiny architecture, freshly loaded (tests may modify it), with its adapter."""
    from dgqtool.models.adapters import adapter_for
    from dgqtool.models.load import load_model

    model, _, _ = load_model(str(request.getfixturevalue(request.param)))
    return model, adapter_for(model.config.model_type)
