"""The prompt artifact: an fp32 prompt tensor plus everything needed to trust it later.

A prompt file is a safetensors file (``kind="ctp-prompt"``) written atomically
and checksummed by :mod:`ctp.io`: the single tensor ``prompt`` (a soft prompt
(k, hidden) or a prefix (2, layers, kv_heads, k, head_dim), see :mod:`ctp.lm`),
fp32, and JSON metadata recording its kind and the model it was learned on (spec,
path, family, hidden size, tokenizer fingerprint, a hash of the embedding
matrix, and the compression config the model had), the training data and
split, the number of steps, the best validation perplexity and the configs
that produced it. Loading against a model checks what must match (hidden size,
tokenizer) and warns about what may differ (the compression: using a prompt
learned on one compressed model with another is a transfer, which the paper
studies on purpose).

:func:`export_peft` / :func:`import_peft` convert to and from PEFT's
prompt-tuning (soft) and prefix-tuning (prefix) adapter formats
(``adapter_config.json`` + ``adapter_model.safetensors`` holding
``prompt_embeddings``: (k, hidden), or (k, layers * 2 * kv_heads * head_dim) with
each virtual token's keys and values layer by layer, keys first), so a prompt
learned here loads with ``PeftModel.from_pretrained`` and vice versa.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from ctp.errors import CTPError, require
from ctp.io import atomic_dir, load_tensors, read_json, save_tensors
from ctp.lm import PREFIX, SOFT, prompt_kind, prompt_length
from ctp.models.fingerprint import embedding_fingerprint

log = logging.getLogger(__name__)

KIND = "ctp-prompt"
TENSOR_KEY = "prompt"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_KEY = "prompt_embeddings"


def _ctp_version() -> str:
    from ctp import __version__

    return __version__


@dataclass
class PromptArtifact:
    """A learned prompt, fp32, and its provenance."""

    embeddings: torch.Tensor  # soft (k, hidden) or prefix (2, layers, kv_heads, k, head_dim), fp32
    model_spec: str | None = None  # what the user passed as --model
    model_path: str | None = None  # where the weights came from
    model_type: str | None = None
    hidden_size: int | None = None
    vocab_size: int | None = None
    num_layers: int | None = None
    tokenizer_hash: str | None = None
    embedding_hash: str | None = None  # sha256 prefix of the input-embedding matrix
    base_hash: str | None = None  # embedding fingerprint of the uncompressed base model (None: unknown)
    compression: dict | None = None  # the compression config of the model it was learned on (None: uncompressed)
    data: dict | None = None  # CorpusRef of the training text
    validation: dict | None = None  # CorpusRef of the validation text used to pick the best prompt
    steps: int = 0  # optimisation steps run
    best_step: int | None = None
    best_val_ppl: float | None = None
    val_ppl_no_prompt: float | None = None
    train_config: dict | None = None
    prompt_config: dict | None = None
    # the tokenizer's leading ids (its BOS) whose place the prompt takes, see ctp.lm; [] none; None not recorded
    # (a PEFT adapter made elsewhere, or a prompt from before ctp placed prompts so)
    lead: list[int] | None = None
    ctp_version: str = field(default_factory=_ctp_version)

    @property
    def num_tokens(self) -> int:
        return prompt_length(self.embeddings)

    @property
    def kind(self) -> str:
        """'soft' or 'prefix' (see :mod:`ctp.lm`)."""
        return prompt_kind(self.embeddings)

    def shape_text(self) -> str:
        """e.g. '25 tokens x 576' (soft) or '25 tokens x 30 layers x 3 kv heads x 64' (prefix)."""
        e = self.embeddings
        if self.kind == PREFIX:
            return f"{self.num_tokens} tokens x {e.shape[1]} layers x {e.shape[2]} kv heads x {e.shape[4]} (prefix)"
        return f"{self.num_tokens} tokens x {e.shape[1]}"

    @property
    def k(self) -> int:
        return self.num_tokens

    def metadata(self) -> dict:
        """Everything but the tensor, as JSON-ready values."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "embeddings"}

    @classmethod
    def from_parts(cls, embeddings: torch.Tensor, meta: dict) -> PromptArtifact:
        known = {f.name for f in fields(cls)} - {"embeddings"}
        return cls(embeddings=embeddings, **{k: v for k, v in meta.items() if k in known})


def artifact_for(model: nn.Module, info, embeddings: torch.Tensor, **meta) -> PromptArtifact:
    """A :class:`PromptArtifact` for ``embeddings`` learned on ``model`` (described by a ``ModelInfo``)."""
    return PromptArtifact(
        embeddings=embeddings.detach().float().cpu().contiguous(),
        model_spec=info.spec,
        model_path=info.path,
        model_type=info.model_type,
        hidden_size=info.hidden_size,
        vocab_size=info.vocab_size,
        num_layers=info.num_layers,
        tokenizer_hash=info.tokenizer_hash,
        embedding_hash=embedding_fingerprint(model),
        base_hash=getattr(info, "base_hash", None),
        compression=info.compression,
        **meta,
    )


def _check_embeddings(t: torch.Tensor, where: str) -> None:
    require((t.dim() == 2 or (t.dim() == 5 and t.shape[0] == 2)) and t.numel() >= 1,
            f"{where} holds a prompt of shape {tuple(t.shape)}, expected soft (tokens, hidden) "
            "or prefix (2, layers, kv_heads, tokens, head_dim)", "recreate it with ctp train-prompt")
    require(t.dtype == torch.float32, f"{where} holds a {t.dtype} prompt, expected float32",
            "recreate it with ctp train-prompt")
    require(bool(torch.isfinite(t).all()), f"{where} holds non-finite values (NaN or Inf)",
            "the prompt diverged: retrain it with a lower --lr")


def save_prompt(path: str | Path, art: PromptArtifact) -> Path:
    """Write ``art`` atomically as a checksummed safetensors file (``kind='ctp-prompt'``)."""
    emb = art.embeddings.detach().float().cpu().contiguous()
    _check_embeddings(emb, "the prompt to save")
    meta = art.metadata()
    meta["num_tokens"] = prompt_length(emb)
    meta["kind"] = prompt_kind(emb)
    if meta["kind"] == PREFIX:  # the cache shape it fits: (2, layers, kv_heads, k, head_dim)
        meta.update(prefix_layers=int(emb.shape[1]), kv_heads=int(emb.shape[2]), head_dim=int(emb.shape[4]))
    return save_tensors(path, {TENSOR_KEY: emb}, metadata=meta, kind=KIND)


def check_compatible(art: PromptArtifact, info, where: str = "the prompt", allow_foreign: bool = False) -> None:
    """Raise :class:`CTPError` if ``art`` cannot be used with the model ``info`` describes; warn on transfers.

    A prompt from another base model (another embedding fingerprint of the uncompressed base) is refused
    unless ``allow_foreign``; another compression of the same base is a transfer (a warning).
    """
    if art.kind == PREFIX:
        layers = int(art.embeddings.shape[1])
        require(layers == info.num_layers,
                f"{where} is a prefix for {layers} layers (learned on {art.model_spec or 'an unknown model'}) "
                f"but model '{info.spec}' has {info.num_layers}",
                f"use a prefix learned on this base model, or learn one with: ctp train-prompt --model {info.spec}")
    hidden = int(art.embeddings.shape[1]) if art.kind == SOFT else info.hidden_size
    if hidden != info.hidden_size:
        raise CTPError(
            f"{where} has hidden size {hidden} (learned on {art.model_spec or 'an unknown model'}) "
            f"but model '{info.spec}' has hidden size {info.hidden_size}",
            f"use a prompt learned on a model with hidden size {info.hidden_size}, "
            f"or learn one with: ctp train-prompt --model {info.spec}",
        )
    if art.tokenizer_hash is None:
        log.warning("%s records no tokenizer fingerprint; cannot check it matches model '%s'", where, info.spec)
    elif art.tokenizer_hash != info.tokenizer_hash:
        raise CTPError(
            f"{where} was learned with tokenizer {art.tokenizer_hash} ({art.model_spec}) but model '{info.spec}' "
            f"uses tokenizer {info.tokenizer_hash}",
            f"prompts only carry over between models sharing a vocabulary: learn one with "
            f"ctp train-prompt --model {info.spec}",
        )
    if art.model_type is not None and art.model_type != info.model_type:
        log.warning("%s was learned on a %s model and is used with a %s model", where, art.model_type, info.model_type)
    base = getattr(info, "base_hash", None)
    if art.base_hash is None:
        log.warning("%s records no base-model fingerprint (a PEFT adapter made elsewhere, or an older prompt): "
                    "cannot check it was learned on the base of model '%s'", where, info.spec)
    elif base is not None and art.base_hash != base:
        if not allow_foreign:
            raise CTPError(f"{where} was learned on another base model ({art.model_spec}, base fingerprint "
                           f"{art.base_hash}) than model '{info.spec}' (base {base})",
                           "learn a prompt on this model, or pass --allow-foreign-prompt to use it on purpose")
        log.warning("%s comes from another base model (%s): used on purpose (--allow-foreign-prompt)", where,
                    art.model_spec)
        return
    if (art.compression or None) != (info.compression or None):
        log.warning(
            "%s was learned on a model with compression %s and is used with compression %s: "
            "this is a transfer across compression settings",
            where, _describe_compression(art.compression), _describe_compression(info.compression),
        )


def _describe_compression(c: dict | None) -> str:
    """A short name for a compression record: its label (e.g. sparsegpt50+gptq4g64), else its config."""
    if not c:
        return "none (dense)"
    label = c.get("label") or (c.get("summary") or {}).get("label")
    return str(label) if label else json.dumps(c.get("config", c), sort_keys=True, default=str)


def check_lead(art: PromptArtifact, lead: list[int], where: str = "the prompt") -> None:
    """Warn when ``art`` was not learned in the place ctp puts it: instead of the leading ids ``lead`` (the
    tokenizer's BOS, see :mod:`ctp.lm`). A prompt that records nothing is taken as learned so where the
    tokenizer has no BOS, and as learned in front of the BOS (PEFT's placement, older ctp prompts) where it has."""
    learned = art.lead if art.lead is not None else []
    if list(learned) != list(lead):
        log.warning("%s was learned %s but ctp puts it in place of the leading token(s) %s (see ctp.lm): its "
                    "results will differ from those it had; learn one again with ctp train-prompt", where,
                    f"in place of the leading token(s) {learned}" if learned else "in front of the whole input",
                    list(lead))


def load_prompt(path: str | Path, model_info=None, allow_foreign: bool = False,
                lead: list[int] | None = None) -> PromptArtifact:
    """Read a prompt file (or a PEFT prompt-tuning directory) and, given a ``ModelInfo``, check it fits the model.

    Raises :class:`CTPError` when the file is missing, damaged or modified (checksum),
    or when the hidden size or tokenizer differ from the model's; logs a warning when
    the compression differs (a transfer, which is allowed), and, given the
    tokenizer's leading ids ``lead``, when the prompt was learned in another place
    (:func:`check_lead`).
    """
    path = Path(path)
    if path.is_dir():
        art = import_peft(path)
    else:
        tensors, meta = load_tensors(path, kind=KIND, what="prompt file")
        require(TENSOR_KEY in tensors, f"prompt file {path} has no '{TENSOR_KEY}' tensor",
                "the file is damaged: recreate it")
        emb = tensors[TENSOR_KEY]
        _check_embeddings(emb, f"prompt file {path}")
        require(meta.get("num_tokens") in (None, prompt_length(emb)) and meta.get("kind") in (None, prompt_kind(emb)),
                f"prompt file {path} says {meta.get('num_tokens')} {meta.get('kind') or 'soft'} tokens but holds "
                f"{prompt_length(emb)} {prompt_kind(emb)}", "the file is damaged: recreate it")
        art = PromptArtifact.from_parts(emb, meta)
    if model_info is not None:
        check_compatible(art, model_info, where=f"prompt {path}", allow_foreign=allow_foreign)
    if lead is not None:
        check_lead(art, lead, where=f"prompt {path}")
    return art


# ----------------------------------------------------------------------------- PEFT format

_PEFT_INIT = {"vocab": "SAMPLE_VOCAB", "random": "RANDOM", "text": "RANDOM"}  # TEXT would need a tokenizer at load


def export_peft(art: PromptArtifact, directory: str | Path) -> Path:
    """Write ``art`` as a PEFT adapter directory (atomically): prompt tuning (soft) or prefix tuning (prefix).

    ``adapter_config.json`` declares ``PROMPT_TUNING`` (``token_dim = hidden``) or
    ``PREFIX_TUNING`` (``token_dim = kv_heads * head_dim``, no projection) for
    ``CAUSAL_LM`` with ``num_virtual_tokens = k`` and one transformer submodule;
    ``adapter_model.safetensors`` holds ``prompt_embeddings`` fp32, with the ctp
    metadata in its header so :func:`import_peft` restores it. A prompt learned
    in place of the tokenizer's BOS (``art.lead``, see :mod:`ctp.lm`) holds the
    BOS's positions itself: PEFT puts it in front of the input, so the text must be
    encoded without the BOS (``add_special_tokens=False``) to read what ctp reads.
    """
    from safetensors.torch import save_file

    emb = art.embeddings.detach().float().cpu().contiguous()
    _check_embeddings(emb, "the prompt to export")
    init = (art.prompt_config or {}).get("init", "vocab")
    config = {
        "auto_mapping": None,
        "base_model_name_or_path": art.model_path or art.model_spec,
        "inference_mode": True,
        "modules_to_save": None,
        "num_attention_heads": None,  # PEFT fills these from the base model's config
        "num_layers": art.num_layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": prompt_length(emb),
        "revision": None,
        "task_type": "CAUSAL_LM",
    }
    if art.kind == PREFIX:
        _, layers, heads, k, head_dim = emb.shape
        config.update(peft_type="PREFIX_TUNING", num_layers=int(layers), num_attention_heads=int(heads),
                      token_dim=int(heads * head_dim), encoder_hidden_size=int(heads * head_dim),
                      prefix_projection=False)
        emb = emb.permute(3, 1, 0, 2, 4).reshape(k, -1).contiguous()  # (k, L*2*H*D): per layer keys then values
    else:
        config.update(peft_type="PROMPT_TUNING", prompt_tuning_init=_PEFT_INIT.get(init, "RANDOM"),
                      prompt_tuning_init_text=None, token_dim=int(emb.shape[1]), tokenizer_kwargs=None,
                      tokenizer_name_or_path=None)
    meta = {"format": "pt", "ctp": json.dumps(art.metadata(), default=str)}
    with atomic_dir(directory) as tmp:
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_file({PEFT_KEY: emb}, str(tmp / PEFT_WEIGHTS), metadata=meta)
    return Path(directory)


def import_peft(directory: str | Path) -> PromptArtifact:
    """Read a PEFT prompt-tuning or prefix-tuning adapter directory (ours or PEFT's own) as a :class:`PromptArtifact`."""
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    cfg = read_json(directory / PEFT_CONFIG, what="PEFT adapter config")
    require(isinstance(cfg, dict), f"{directory / PEFT_CONFIG} does not hold a mapping",
            "the adapter is damaged: recreate it")
    peft_type = cfg.get("peft_type")
    require(peft_type in ("PROMPT_TUNING", "PREFIX_TUNING"),
            f"{directory} is a PEFT '{peft_type}' adapter, not PROMPT_TUNING or PREFIX_TUNING",
            "pass a prompt-tuning or prefix-tuning adapter directory")
    require(not cfg.get("prefix_projection"), f"{directory} is a prefix-tuning adapter with a projection MLP",
            "ctp reads prefixes stored as keys and values: train with prefix_projection=False")
    weights = directory / PEFT_WEIGHTS
    if not weights.is_file():
        extra = " (only the pickle adapter_model.bin is there; ctp reads safetensors only)" \
            if (directory / "adapter_model.bin").is_file() else ""
        raise CTPError(f"{directory} has no {PEFT_WEIGHTS}{extra}",
                       "save the adapter with safe_serialization=True")
    try:
        with safe_open(str(weights), framework="pt") as f:
            keys = list(f.keys())
            header = f.metadata() or {}
            require(PEFT_KEY in keys, f"{weights} has no '{PEFT_KEY}' tensor (has: {', '.join(keys)})",
                    "pass a prompt-tuning adapter directory")
            emb = f.get_tensor(PEFT_KEY)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CTPError(f"{weights} is not a readable safetensors file ({str(e).splitlines()[0]})",
                       "the file is truncated or damaged: recreate it") from e
    subs = cfg.get("num_transformer_submodules") or 1
    n_virtual = cfg.get("num_virtual_tokens")
    require(subs == 1, f"{directory} has {subs} transformer submodules (an encoder-decoder adapter)",
            "ctp prompts are for decoder-only models: pass a CAUSAL_LM adapter")
    require(n_virtual in (None, int(emb.shape[0])),
            f"{directory} declares {n_virtual} virtual tokens but holds {emb.shape[0]}",
            "the adapter is damaged: recreate it")
    emb = emb.float().contiguous()
    if peft_type == "PREFIX_TUNING":
        emb = _prefix_from_peft(emb, cfg, directory)
    _check_embeddings(emb, str(weights))
    meta: dict = {}
    if "ctp" in header:
        try:
            meta = json.loads(header["ctp"])
        except json.JSONDecodeError:
            meta = None
        if not isinstance(meta, dict):
            log.warning("%s has unreadable ctp metadata; importing the prompt alone", weights)
            meta = {}
    art = PromptArtifact.from_parts(emb, meta)
    if art.hidden_size is None:
        art.hidden_size = int(emb.shape[1])
    if art.model_path is None and cfg.get("base_model_name_or_path"):
        art.model_path = cfg["base_model_name_or_path"]
    return art


def _prefix_from_peft(flat: torch.Tensor, cfg: dict, directory: Path) -> torch.Tensor:
    """PEFT's (k, L*2*H*D) prefix embedding as ctp's (2, L, H, k, D) keys/values tensor."""
    layers, heads, token_dim = cfg.get("num_layers"), cfg.get("num_attention_heads"), cfg.get("token_dim")
    ok = all(isinstance(v, int) and v > 0 for v in (layers, heads, token_dim)) and token_dim % heads == 0
    require(ok and flat.dim() == 2 and flat.shape[1] == layers * 2 * token_dim,
            f"{directory} declares {layers} layers x {heads} heads x {token_dim} but holds prompt embeddings of "
            f"shape {tuple(flat.shape)}", "the adapter is damaged: recreate it")
    k = flat.shape[0]
    return flat.view(k, layers, 2, heads, token_dim // heads).permute(2, 1, 3, 0, 4).contiguous()  # (2, L, H, k, D)


def describe(art: PromptArtifact) -> str:
    """One line about a prompt, for logs and summaries."""
    ppl = "n/a" if art.best_val_ppl is None or not math.isfinite(art.best_val_ppl) else f"{art.best_val_ppl:.3f}"
    return (f"{art.shape_text()} on {art.model_spec} "
            f"({'compressed' if art.compression else 'dense'}), {art.steps} steps, best val PPL {ppl}")
