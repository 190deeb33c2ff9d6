"""The fingerprint of a model's input embedding: which base model a prompt was learned on."""

from __future__ import annotations

import hashlib

import torch


@torch.no_grad()
def embedding_fingerprint(model, source=None) -> str:
    """A short SHA-256 of the input-embedding matrix (cheap: one pass over its bytes); an int8-packed embedding
    gives its dense matrix's, recorded when it was packed. A matrix left on the meta device is read from the
    checkpoint ``source`` (:class:`ctp.models.shards.BlockSource`) a chunk of rows at a time: the same digest."""
    emb = model.get_input_embeddings()
    if getattr(emb, "fingerprint", None):
        return emb.fingerprint
    h = hashlib.sha256()
    if emb.weight.is_meta:
        name = source.name_of(model, emb.weight)
        h.update(f"{emb.weight.dtype}{tuple(emb.weight.shape)}".encode())
        for _, rows in source.chunks(name, emb.weight.dtype):
            h.update(rows.contiguous().reshape(-1).view(torch.uint8).numpy())
        return h.hexdigest()[:16]
    w = emb.weight.detach().contiguous().cpu()
    h.update(f"{w.dtype}{tuple(w.shape)}".encode())
    h.update(w.reshape(-1).view(torch.uint8).numpy())  # the bytes in place: no copy of the matrix
    return h.hexdigest()[:16]
