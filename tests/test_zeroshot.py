"""Zero-shot tasks through lm-eval on local files: the task configs read the local layout, and
lm-eval's accuracy equals a direct log-likelihood computation on the same model."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import SHARED
from dgqtool.cli import app
from dgqtool.eval.zeroshot import zero_shot
from dgqtool.models.load import load_model

pytest.importorskip("lm_eval")
runner = CliRunner()


def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """lm-eval's scoring: continuation tokens = encode(context + continuation) minus encode(context)."""
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    n_ctx = len(tokenizer(context, add_special_tokens=False).input_ids)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    return float(sum(logp[i - 1, whole[i]] for i in range(n_ctx, len(whole))))


@pytest.mark.skipif(not (SHARED / "piqa" / "valid.jsonl").is_file(), reason="needs ../shared/assets/data")
def test_piqa_accuracy_equals_a_direct_computation(tiny_llama):
    model, tokenizer, _ = load_model(str(tiny_llama), "float32")
    limit = 24
    scores = zero_shot(model, tokenizer, ["piqa"], limit=limit, batch_size=4, data_dir=str(SHARED))["piqa"]
    rows = [json.loads(line) for line in (SHARED / "piqa" / "valid.jsonl").read_text().splitlines()[:limit]]
    labels = [int(v) for v in (SHARED / "piqa" / "valid-labels.lst").read_text().split()[:limit]]
    hits = hits_norm = 0
    for row, label in zip(rows, labels):
        context = f"Question: {row['goal']}\nAnswer:"
        ll = [_loglikelihood(model, tokenizer, context, " " + row[s]) for s in ("sol1", "sol2")]
        norm = [v / len(row[s]) for v, s in zip(ll, ("sol1", "sol2"))]
        hits += int(max(range(2), key=ll.__getitem__) == label)
        hits_norm += int(max(range(2), key=norm.__getitem__) == label)
    assert scores["samples"] == limit
    assert scores["acc"] == pytest.approx(hits / limit) and scores["acc_norm"] == pytest.approx(hits_norm / limit)
    for name, p in (("acc", hits / limit), ("acc_norm", hits_norm / limit)):  # lm-eval's sample standard error
        assert scores[f"{name}_stderr"] == pytest.approx((p * (1 - p) / (limit - 1)) ** 0.5)


def _write_local_tasks(root):
    """Three items per task in each original release's own format."""
    (root / "arc").mkdir(parents=True)
    (root / "boolq").mkdir()
    (root / "winogrande").mkdir()
    arc = [{"id": f"q{i}", "answerKey": "B", "question": {"stem": f"which river {i}?", "choices": [
        {"text": "the old river", "label": "A"}, {"text": "the red house", "label": "B"}]}} for i in range(3)]
    (root / "arc" / "ARC-Easy-Test.jsonl").write_text("\n".join(map(json.dumps, arc)))
    boolq = [{"question": "is the river open", "passage": "the river is open .", "idx": i, "label": ["true", "false", True][i]}
             for i in range(3)]
    (root / "boolq" / "val.jsonl").write_text("\n".join(map(json.dumps, boolq)))
    wino = [{"qID": str(i), "sentence": "the birds saw the boats so _ were seen .", "option1": "birds", "option2": "boats"}
            for i in range(3)]
    (root / "winogrande" / "dev.jsonl").write_text("\n".join(map(json.dumps, wino)))
    (root / "winogrande" / "dev-labels.lst").write_text("1\n2\n1\n")
    (root / "hellaswag").mkdir()
    swag = [{"ind": i, "activity_label": "Rowing", "ctx_a": "the people row the boats .", "ctx_b": "they", "ctx": "",
             "endings": ["cross the river .", "eat the house .", "see the birds .", "open the road ."],
             "source_id": "x", "split": "val", "split_type": "indomain", "label": i % 4} for i in range(3)]
    (root / "hellaswag" / "hellaswag_val.jsonl").write_text("\n".join(map(json.dumps, swag)))
    (root / "mmlu" / "test").mkdir(parents=True)  # the release's CSVs: no header, answer as a letter
    (root / "mmlu" / "test" / "anatomy_test.csv").write_text('where is the river,"the city, old",the road,a,b,B\n' * 2)
    (root / "mmlu" / "test" / "astronomy_test.csv").write_text("which house,red,old,new,big,D\n")


def test_eval_command_runs_zero_shot_tasks_on_a_checkpoint(tiny_llama, corpus_file, tmp_path):
    ckpt = tmp_path / "ckpt"
    assert runner.invoke(app, ["quantize", str(tiny_llama), "-o", str(ckpt), "--calib-data", str(corpus_file),
                               "--nsamples", "4", "--seqlen", "64", "--group", "32", "--recipe", "paper", "--no-verify"]).exit_code == 0
    _write_local_tasks(tmp_path / "data")
    result = runner.invoke(app, ["--json", "eval", str(ckpt), "--task", "arc_easy", "--task", "boolq", "--task", "winogrande",
                                 "--task", "hellaswag", "--task", "mmlu", "--data-dir", str(tmp_path / "data")])
    assert result.exit_code == 0, result.output
    tasks = json.loads(result.stdout.strip().splitlines()[-1])["tasks"]
    assert {t: tasks[t]["samples"] for t in tasks} == {"arc_easy": 3, "boolq": 3, "winogrande": 3, "hellaswag": 3, "mmlu": 3}
    for score in tasks.values():
        assert round(score["acc"] * 3) == pytest.approx(score["acc"] * 3)  # a count of 3 items
    (tmp_path / "data" / "mmlu" / "test" / "rivers_test.csv").write_text("a,b,c,d,e,A\n")
    unknown = runner.invoke(app, ["eval", str(ckpt), "--task", "mmlu", "--data-dir", str(tmp_path / "data")])
    assert unknown.exit_code == 2 and "'rivers' is not an MMLU subject" in unknown.output
    missing = runner.invoke(app, ["eval", str(ckpt), "--task", "piqa", "--data-dir", str(tmp_path / "data")])
    assert missing.exit_code == 2 and "piqa data not found" in missing.output
