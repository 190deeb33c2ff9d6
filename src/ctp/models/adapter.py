"""Architecture adapter: every place where decoder families differ, in one table.

The rest of ctp never names a model class. It asks this module where the
decoder layers, token embedding, final norm and LM head live, and which linear
layers inside a decoder layer run in which order (for true-sequential
compression). A model type missing from the table falls back to discovery: the
``nn.ModuleList`` holding ``num_hidden_layers`` blocks, and every linear layer
inside a block, in module order.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from ctp.errors import CTPError, require

# Linear-like module types: nn.Linear (weight (out, in)) and GPT-2's Conv1D (weight (in, out)).
try:  # transformers keeps Conv1D in pytorch_utils
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - very old/new transformers
    Conv1D = ()  # type: ignore[assignment]


@dataclass(frozen=True)
class Arch:
    """Where things live in one family of causal LMs (dotted paths from the CausalLM root)."""

    family: str
    layers: str
    embed: str
    final_norm: str
    head: str
    # Groups of linear layers inside one decoder layer, in execution order. Layers in one
    # group read the same input and may be compressed from the same captured activations.
    sequential: tuple[tuple[str, ...], ...] | None = None


_LLAMA_LIKE = Arch(
    family="llama",
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    head="lm_head",
    sequential=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
)

ARCHS: dict[str, Arch] = {
    # Llama family and its close relatives share one layout.
    **{t: _LLAMA_LIKE for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "smollm3")},
    "opt": Arch(
        family="opt",
        layers="model.decoder.layers",
        embed="model.decoder.embed_tokens",
        final_norm="model.decoder.final_layer_norm",
        head="lm_head",
        sequential=(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
    ),
    "gpt2": Arch(
        family="gpt2",
        layers="transformer.h",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        head="lm_head",
        sequential=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
    ),
    "gpt_neox": Arch(
        family="gpt_neox",
        layers="gpt_neox.layers",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        head="lm_head",
        sequential=(
            ("attention.query_key_value",),
            ("attention.dense",),
            ("mlp.dense_h_to_4h",),
            ("mlp.dense_4h_to_h",),
        ),
    ),
}


def _get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def _discover(model: nn.Module) -> Arch:
    """Fallback for unknown model types: find the block list and the head."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    layers_path = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n_layers is None or len(mod) == n_layers):
            layers_path = name
            break
    if layers_path is None:
        raise CTPError(
            f"cannot find the decoder layers of model type '{model.config.model_type}'",
            "add an entry for it to ctp.models.adapter.ARCHS",
        )
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    return Arch(
        family=model.config.model_type,
        layers=layers_path,
        embed=names.get(id(embed), ""),
        final_norm="",
        head=names.get(id(head), ""),
        sequential=None,
    )


def get_arch(model: nn.Module) -> Arch:
    """The :class:`Arch` entry of ``model`` (a ``*ForCausalLM``)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise CTPError("the model has no config.model_type", "pass a Hugging Face causal LM")
    arch = ARCHS.get(model_type)
    if arch is not None:
        try:
            _get(model, arch.layers)
            return arch
        except AttributeError:
            pass  # layout differs from the table (e.g. a wrapped model): discover instead
    return _discover(model)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks."""
    return _get(model, get_arch(model).layers)  # type: ignore[return-value]


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def linear_layers(layer: nn.Module) -> dict[str, nn.Module]:
    """All linear-like modules of one decoder block, by dotted name, in module order."""
    return {name: mod for name, mod in layer.named_modules() if name and is_linear(mod)}


def sequential_groups(model: nn.Module, layer: nn.Module) -> list[list[str]]:
    """Linear layers of ``layer`` grouped in execution order (true-sequential compression).

    Names the table lists but the block lacks are skipped; linear layers the
    table does not list are appended as their own groups, so nothing is missed.
    """
    present = linear_layers(layer)
    table = get_arch(model).sequential
    groups: list[list[str]] = []
    seen: set[str] = set()
    if table is not None:
        for group in table:
            names = [n for n in group if n in present]
            if names:
                groups.append(names)
                seen.update(names)
    groups.extend([n] for n in present if n not in seen)
    return groups


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features), whatever the module's storage layout."""
    w = module.weight.data
    return w.t() if (bool(Conv1D) and isinstance(module, Conv1D)) else w


def set_weight_matrix(module: nn.Module, w: torch.Tensor) -> None:
    """Write an (out_features, in_features) matrix back in the module's own layout and dtype."""
    if bool(Conv1D) and isinstance(module, Conv1D):
        w = w.t()
    w = w.to(module.weight.dtype).contiguous()
    if module.weight.is_meta:  # a model built without weight memory (load_compressed): take the tensor itself
        module.weight = nn.Parameter(w, requires_grad=module.weight.requires_grad)
    else:
        module.weight.data.copy_(w)


def max_positions(model: nn.Module) -> int | None:
    """The positions the model was built for (``max_position_embeddings`` / ``n_positions``), None if unstated."""
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_positions(model: nn.Module, tokens: int, what: str, fix: str) -> None:
    """A :class:`~ctp.errors.CTPError` ("{what} exceeds the model's N positions") when ``tokens`` > N."""
    limit = max_positions(model)
    require(limit is None or tokens <= limit, f"{what} exceeds the model's {limit} positions", fix)



def head_parts(model: nn.Module) -> tuple[nn.Module, nn.Linear, float | None] | None:
    """(body, head, softcap) such that the model's logits are ``cap(head(body(...).last_hidden_state))``.

    ``body`` is the base transformer the causal LM's forward calls (its output is
    the final hidden state, after the final norm), ``head`` the LM head, and
    ``softcap`` the final logit soft-capping of Gemma 2-style models (``logits =
    c * tanh(logits / c)``) or None. None when the head is not a plain linear
    layer (callers then use the model's own forward).
    """
    head = model.get_output_embeddings()
    body = getattr(model, "base_model", None)
    if not isinstance(head, nn.Linear) or body is None or body is model:
        return None
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return body, head, (float(cap) if cap else None)


def forward_accepts(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes the keyword ``name`` (e.g. ``logits_to_keep``, which not every family has)."""
    return name in inspect.signature(model.forward).parameters
