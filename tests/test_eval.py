"""Perplexity protocol details against hand computations, offline data loading, bad data dirs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from conftest import SHARED
from dgqtool.cli import app
from dgqtool.corpora import load_corpus
from dgqtool.errors import DGQError
from dgqtool.eval.windows import c4_windows
from dgqtool.eval.ppl import perplexity, windows_of


def test_windows_are_non_overlapping_and_drop_the_remainder():
    ids = torch.arange(10)
    w = windows_of(ids, 3)
    assert w.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert windows_of(ids, 3, limit=2).shape == (2, 3)
    with pytest.raises(DGQError, match="fewer than one window"):
        windows_of(ids, 11)


def test_perplexity_matches_a_hand_computation(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    windows = torch.randint(0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    nlls = []
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=w[None]).logits[0]
            nlls.append(float(F.cross_entropy(logits[:-1], w[1:])))
    expected = math.exp(sum(nlls) / 3)
    assert perplexity(model, windows, batch_size=2).ppl == pytest.approx(expected, rel=1e-5)


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared assets not present")
def test_local_wikitext2_is_the_gptq_string_byte_for_byte():
    text = load_corpus("wikitext2", "test", str(SHARED))
    assert text == (SHARED / "wikitext2" / "wikitext2_test_joined.txt").read_text(encoding="utf-8")
    ptb = load_corpus("ptb", "test", str(SHARED))
    assert ptb.startswith(" no it was n't black monday ") and "\n" not in ptb


def test_missing_local_data_names_the_expected_file(tmp_path):
    with pytest.raises(DGQError, match=str(tmp_path / "wikitext2" / "wiki.test.raw")):
        load_corpus("wikitext2", "test", str(tmp_path))
    result = CliRunner().invoke(app, ["eval", str(tmp_path), "--data-dir", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_c4_windows_are_seeded_and_skip_short_documents(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    docs = ["the red house " * 40, "short", "the old river of the city " * 30]
    a, b = c4_windows(docs, tok, 16, 5), c4_windows(docs, tok, 16, 5)
    assert a.shape == (5, 16) and torch.equal(a, b)
    short = tok("short", return_tensors="pt").input_ids[0]
    assert not any(torch.equal(row[: len(short)], short) for row in a)


def test_eval_command_on_a_checkpoint_and_a_float_model(tiny_llama, corpus_file, tmp_path):
    runner = CliRunner()
    ckpt = tmp_path / "ckpt"
    assert runner.invoke(app, ["quantize", str(tiny_llama), "-o", str(ckpt), "--calib-data", str(corpus_file),
                               "--nsamples", "4", "--seqlen", "64", "--group", "32", "--recipe", "paper", "--no-verify"]).exit_code == 0
    data = tmp_path / "data" / "wikitext2"
    data.mkdir(parents=True)
    (data / "wiki.test.raw").write_text(corpus_file.read_text())
    scores = {}
    for name, target in (("fp", tiny_llama), ("q", ckpt)):
        out = tmp_path / f"{name}.json"
        result = runner.invoke(app, ["eval", str(target), "--data-dir", str(tmp_path / "data"), "--seqlen", "64",
                                     "--limit", "4", "--output", str(out)])
        assert result.exit_code == 0, result.output
        scores[name] = json.loads(out.read_text())["tasks"]["wikitext2"]
    assert scores["fp"]["windows"] == scores["q"]["windows"] == 4
    assert scores["fp"]["ppl"] < scores["q"]["ppl"] < 1.5 * scores["fp"]["ppl"]

    report = tmp_path / "report"
    result = runner.invoke(app, ["--json", "eval", str(tiny_llama), "--compare", str(ckpt), "--data-dir", str(tmp_path / "data"),
                                 "--seqlen", "64", "--limit", "4", "--report", str(report)])
    assert result.exit_code == 0, result.output
    runs = json.loads(result.stdout.strip().splitlines()[-1])["runs"]
    assert [r["tasks"]["wikitext2"]["ppl"] for r in runs] == [scores["fp"]["ppl"], scores["q"]["ppl"]]
    rows = (report / "compare.md").read_text().splitlines()
    assert len(rows) == 4 and f"{scores['q']['ppl']:.3f} | {scores['q']['ppl'] - scores['fp']['ppl']:+.3f}" in rows[3]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (report / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
