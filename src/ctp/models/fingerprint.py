"""The fingerprint of a model's input embedding: which base model a prompt was learned on."""

from __future__ import annotations

import hashlib

import torch


@torch.no_grad()
def embedding_fingerprint(model) -> str:
    """A short SHA-256 of the input-embedding matrix (cheap: one pass over its bytes); an int8-packed embedding
    gives its dense matrix's, recorded when it was packed."""
    emb = model.get_input_embeddings()
    if getattr(emb, "fingerprint", None):
        return emb.fingerprint
    w = emb.weight.detach().contiguous().cpu()
    h = hashlib.sha256()
    h.update(f"{w.dtype}{tuple(w.shape)}".encode())
    h.update(w.reshape(-1).view(torch.uint8).numpy())  # the bytes in place: no copy of the matrix
    return h.hexdigest()[:16]
