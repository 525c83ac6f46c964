#!/usr/bin/env bash
# Example CI pipeline: install, quantize the embedded default model, verify with a perplexity gate,
# evaluate a few windows, export for vLLM (compressed-tensors). Every step writes a JSON summary
# to $OUT/*.json and fails the job with dgq's exit code (2 bad input, 3 verification, 1 internal).
#   scripts/ci_pipeline.sh                      # SmolLM2-135M, CPU-sized settings, the default recipe
#                                               # (~6 min on 2 cores measured with the paper recipe, before rotation + GPTQ)
#   MODEL=path/to/model CALIB_DATA=text.txt SKIP_INSTALL=1 scripts/ci_pipeline.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-smollm2-135m}
OUT=${OUT:-out/pipeline}
GROUP=${GROUP:-64}
NSAMPLES=${NSAMPLES:-8}
SEQLEN=${SEQLEN:-512}
EVAL_SEQLEN=${EVAL_SEQLEN:-512}
EVAL_WINDOWS=${EVAL_WINDOWS:-2}
MAX_PPL_INCREASE=${MAX_PPL_INCREASE:-20}
export DGQ_DATA_DIR=${DGQ_DATA_DIR:-$(cd .. && pwd)/shared/assets/data}
DGQ=${DGQ:-.venv/bin/dgq}
calib=()
if [ -n "${CALIB_DATA:-}" ]; then calib=(--calib-data "$CALIB_DATA"); fi

if [ -z "${SKIP_INSTALL:-}" ]; then make install; fi
mkdir -p "$OUT"
"$DGQ" --json quantize "$MODEL" -o "$OUT/ckpt" --group "$GROUP" --nsamples "$NSAMPLES" --seqlen "$SEQLEN" \
    "${calib[@]}" --no-verify --force > "$OUT/quantize.json"
"$DGQ" --json verify "$OUT/ckpt" --work "$OUT/ckpt.work" --max-ppl-increase "$MAX_PPL_INCREASE" \
    --ppl-limit "$EVAL_WINDOWS" --ppl-seqlen "$EVAL_SEQLEN" > "$OUT/verify.json"
"$DGQ" --json eval "$OUT/ckpt" --task wikitext2 --limit "$EVAL_WINDOWS" --seqlen "$EVAL_SEQLEN" > "$OUT/eval.json"
"$DGQ" --json export "$OUT/ckpt" --format compressed-tensors -o "$OUT/ckpt-compressed-tensors" --force > "$OUT/export.json"
echo "pipeline ok: $OUT"
