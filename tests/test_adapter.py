import pytest
import torch

from conftest import TINY_CONFIGS, make_tiny
from ctp.models import adapter
from ctp.lm import embed_inputs


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_adapter_finds_every_part(model_type):
    model = make_tiny(model_type)
    arch = adapter.get_arch(model)
    layers = adapter.decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers
    # embedding and head are where the table says
    assert model.get_submodule(arch.embed) is model.get_input_embeddings()
    assert model.get_submodule(arch.head) is model.get_output_embeddings()
    assert model.get_submodule(arch.final_norm) is not None
    # every linear of a block is in exactly one sequential group, in the block's execution order
    groups = adapter.sequential_groups(model, layers[0])
    flat = [n for g in groups for n in g]
    assert sorted(flat) == sorted(adapter.linear_layers(layers[0]))
    assert len(flat) == len(set(flat)) >= 4
    assert len(groups) >= 4, "true-sequential order should split attention and MLP"


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_weight_matrix_is_out_by_in_and_round_trips(model_type):
    model = make_tiny(model_type)
    layer = adapter.decoder_layers(model)[0]
    for name, mod in adapter.linear_layers(layer).items():
        w = adapter.weight_matrix(mod)
        x = torch.randn(3, w.shape[1])
        # the (out, in) matrix reproduces the module's own output
        ref = mod(x)
        bias = mod.bias if getattr(mod, "bias", None) is not None else 0
        torch.testing.assert_close(x @ w.t() + bias, ref, rtol=1e-5, atol=1e-5)
        adapter.set_weight_matrix(mod, torch.zeros_like(w))
        assert adapter.weight_matrix(mod).abs().sum() == 0, name


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_inputs_embeds_path_matches_input_ids(model_type):
    """Feeding embeddings through embed_inputs reproduces the input_ids forward (scale included)."""
    model = make_tiny(model_type)
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        out = model(**embed_inputs(model, ids)).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_unknown_family_is_discovered():
    model = make_tiny("llama")
    model.config.model_type = "some_new_llama"
    arch = adapter.get_arch(model)
    assert arch.layers == "model.layers"
    groups = adapter.sequential_groups(model, adapter.decoder_layers(model)[0])
    assert sum(len(g) for g in groups) == 7
