"""The stages of `dgq quantize`, one module each, over a work directory:

    WORK/calibrate/  tokens + per-input channel maxima (stats.safetensors), manifest.json
    WORK/smooth/     smoothing vectors and smoothed channel maxima (scales.safetensors)
    WORK/search/     one layer_NNN.safetensors per decoder layer (resumable per layer)
    OUT/             the packed checkpoint (stages/pack.py, written by dgqtool.pack)

graph.py holds what every stage shares (the context, the up-to-date check); quantize.py runs them
in order. A stage whose fingerprint (its options + its inputs' content hashes) matches is skipped.
"""
