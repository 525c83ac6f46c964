"""Layer-by-layer capture reproduces the model's own forward, and consumes the layer stack."""

from __future__ import annotations

import torch

from dgqtool.calib.capture import run_layers
from dgqtool.models.adapters import decoder_layers


class RecordInputs:
    def __init__(self):
        self.seen: dict[int, torch.Tensor] = {}

    def attach(self, index, layer):
        def hook(module, args, kwargs):
            self.seen.setdefault(index, []).append(args[0].detach().clone())

        return [layer.register_forward_pre_hook(hook, with_kwargs=True)]

    def finish(self, index, layer):
        return False


def test_layer_inputs_match_the_full_forward(tiny_model):
    model, adapter = tiny_model
    tokens = torch.randint(0, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=tokens, output_hidden_states=True).hidden_states
    visitor = RecordInputs()
    run_layers(model, adapter, tokens, visitor, "cpu", batch_size=2)
    assert sorted(visitor.seen) == [0, 1]
    for index, batches in visitor.seen.items():
        torch.testing.assert_close(torch.cat(batches), expected[index], rtol=1e-5, atol=1e-5)
    # finished layers are released, not copied back: peak memory does not grow with depth
    assert all(p.device.type == "meta" for layer in decoder_layers(model, adapter) for p in layer.parameters())
