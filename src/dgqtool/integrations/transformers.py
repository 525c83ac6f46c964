"""`AutoModelForCausalLM.from_pretrained(dgq_checkpoint)`: the `dgq` quantization config and HfQuantizer.

Before any weight is read, the quantizer checks the directory as load_checkpoint does (config
fields, every file against the manifest, the packed tensors' dtypes and shapes from the
safetensors header) and swaps each adapter linear of the meta model for an empty DGQ module of
the checkpoint's format; transformers then loads the packed buffers by name, and the codes and
scales are checked before the model is returned. Same modules, same tensors: the logits are
bit-identical to load_checkpoint's.
"""

from __future__ import annotations

import re
from pathlib import Path

from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..checkpoint import check_quantized_modules, packed_problem, replace_linears
from ..errors import DGQError
from ..format import (QUANT_METHOD, WEIGHTS, checked_config, group_of, guard_key, online_rotations, static_input,
                      tensor_header)
from ..nn.dgq_linear import FORMATS


class DGQConfig(QuantizationConfigMixin):
    """The checkpoint's quantization_config block as transformers holds it; format.py defines and
    checks the fields."""

    def __init__(self, **block):
        self.__dict__.update(block)
        self.quant_method = QUANT_METHOD


class DGQHfQuantizer(HfQuantizer):
    requires_calibration = True  # loads dgq checkpoints only; `dgq quantize` makes them

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not checkpoint_files:
            raise DGQError("a dgq checkpoint loads from a local directory holding model.safetensors")
        path = Path(checkpoint_files[0]).parent
        q = checked_config(path)["quantization_config"]
        header = tensor_header(path / WEIGHTS)
        model._keys_to_ignore_on_load_unexpected.add(re.escape(guard_key(header)))
        replace_linears(model, FORMATS[q["format"]], model.dtype, static_input(q),
                        lambda linear, where: group_of(q, linear.in_features, where), online_rotations(q), path,
                        tuple(q.get("per_token_linears", ())))
        problem = packed_problem(model, header)
        if problem:
            raise DGQError(f"{path}: {problem}")
        self.path = path

    def _process_model_after_weight_loading(self, model, **kwargs):
        check_quantized_modules(model, self.path)
        return model

    def is_serializable(self) -> bool:
        return False  # `dgq` writes checkpoints, with their manifest; save_pretrained would not

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True  # each DGQ linear is one torch.ops.dgq.linear call; an online rotation one op or torch ops


def register() -> None:
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantization_config(QUANT_METHOD)(DGQConfig)
        register_quantizer(QUANT_METHOD)(DGQHfQuantizer)
