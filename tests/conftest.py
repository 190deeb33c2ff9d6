"""Shared fixtures: the real embedded model's tokenizer and directory, and tiny random models of each family."""

from __future__ import annotations

import os

import pytest
import torch

# OMP_NUM_THREADS wins when set (on a shared machine, 1 avoids threads spinning against each other)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))

# Tiny configs of every family the adapter covers; vocab matches the real SmolLM2 tokenizer.
VOCAB = 49152
TINY_CONFIGS = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512),
    "mistral": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=512),
    "gemma3_text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, sliding_window=32),
    "opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64,
                max_position_embeddings=512),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=512),
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=512),
}


def make_tiny(model_type: str, seed: int = 0, vocab_size: int = VOCAB):
    """A randomly initialised tiny causal LM of ``model_type`` (fp32, eval mode)."""
    from transformers import AutoModelForCausalLM, CONFIG_MAPPING

    cfg = CONFIG_MAPPING[model_type](vocab_size=vocab_size, **TINY_CONFIGS[model_type])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def smol_dir() -> str:
    """The real embedded default model as a Hugging Face directory (converted once, cached)."""
    from ctp.models.load import resolve

    return resolve("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer(smol_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_dir)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer) -> str:
    """A tiny random Llama saved with the real tokenizer: a model directory any command accepts."""
    d = tmp_path_factory.mktemp("tiny-llama")
    model = make_tiny("llama")
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return str(d)
