"""transformers integration: after `import dgqtool`, AutoModelForCausalLM.from_pretrained(checkpoint)
is load_checkpoint's model, bit for bit; without it, from_pretrained stops instead of loading
random weights."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

import dgqtool  # noqa: F401  (registers the dgq quantizer)
from dgqtool.checkpoint import load_checkpoint
from dgqtool.errors import DGQError
from dgqtool.models.adapters import adapter_for
from dgqtool.nn.dgq_linear import DGQLinear
from tiny_packed import write_packed

IDS = torch.randint(0, 200, (2, 20), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_opt"])
def packed(request, tmp_path_factory):
    return write_packed(request.getfixturevalue(request.param), tmp_path_factory.mktemp("hf") / "ckpt")


def _from_pretrained(path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)


@torch.no_grad()
def test_from_pretrained_equals_load_checkpoint_bit_for_bit(packed):
    hf = _from_pretrained(packed, device_map="cpu")
    ours, tokenizer, _ = load_checkpoint(packed)
    linears = len(adapter_for(hf.config.model_type).linear_names()) * hf.config.num_hidden_layers
    assert sum(isinstance(m, DGQLinear) for m in hf.modules()) == linears and not hf.training
    assert hf.config.quantization_config.quant_method == "dgq"
    expected = ours(IDS).logits
    assert torch.equal(hf(IDS).logits, expected)
    ids = tokenizer("the red house of the old", return_tensors="pt").input_ids
    greedy = {"max_new_tokens": 10, "min_new_tokens": 10, "do_sample": False, "pad_token_id": tokenizer.eos_token_id}
    tokens = hf.generate(ids, **greedy)
    assert tokens.shape == (1, ids.shape[1] + 10) and torch.equal(tokens, ours.generate(ids, **greedy))


def test_without_dgqtool_from_pretrained_fails_loudly(packed, monkeypatch):
    from transformers.quantizers import auto

    monkeypatch.delitem(auto.AUTO_QUANTIZER_MAPPING, "dgq")
    monkeypatch.delitem(auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "dgq")
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        _from_pretrained(packed)


@pytest.mark.parametrize("damage,message", [("stray file", "not covered by dgq_manifest.json"),
                                            ("wrong dtype", "has dtype torch.float32, expected torch.uint8")])
def test_from_pretrained_checks_the_checkpoint_like_load_checkpoint(packed, tmp_path, damage, message):
    from safetensors.torch import load_file, save_file

    from dgqtool.artifacts import sha256_file

    bad = tmp_path / "bad"
    shutil.copytree(packed, bad)
    if damage == "stray file":
        (bad / "notes.txt").write_text("x")
    else:
        state = load_file(bad / "model.safetensors")
        key = next(k for k in state if k.endswith(".qzeros"))
        state[key] = state[key].float()
        save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
        manifest = json.loads((bad / "dgq_manifest.json").read_text())
        manifest["files"]["model.safetensors"] = sha256_file(bad / "model.safetensors")
        (bad / "dgq_manifest.json").write_text(json.dumps(manifest))
    for load in (load_checkpoint, _from_pretrained):
        with pytest.raises(DGQError, match=message):
            load(bad)


def test_import_dgqtool_registers_lazily():
    """`import dgqtool` does not import transformers; importing transformers afterwards registers dgq."""
    code = ("import sys, dgqtool; assert 'transformers' not in sys.modules; "
            "from transformers import AutoModelForCausalLM; from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING; "
            "print(AUTO_QUANTIZER_MAPPING['dgq'].__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "DGQHfQuantizer"


def test_lm_eval_hflm_loads_the_dgq_model(packed):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(packed), device="cpu", batch_size=1)
    assert any(isinstance(m, DGQLinear) for m in lm.model.modules())
    [(loglik, _)] = lm.loglikelihood([Instance("loglikelihood", {}, ("the red house", " of the old"), 0)])
    ours, tokenizer, _ = load_checkpoint(packed)
    ids = tokenizer("the red house of the old", return_tensors="pt").input_ids
    context = tokenizer("the red house", return_tensors="pt").input_ids.shape[1]
    with torch.no_grad():
        logprobs = torch.log_softmax(ours(ids).logits.double(), -1)[0]
    expected = sum(logprobs[i - 1, ids[0, i]].item() for i in range(context, ids.shape[1]))
    assert loglik == pytest.approx(expected, abs=1e-4)
