"""Invariants of the compression kernels on small real tensors (CPU, seconds)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from hypothesis import given, settings
from hypothesis import strategies as st

from ctp.compress import kernels as K
from ctp.compress import weight as weight_module
from ctp.compress.config import CompressConfig, PruneConfig, QuantConfig
from ctp.compress.quant import (
    dequantize,
    pack_int,
    pack_mask,
    quant_params,
    quantize_int,
    unpack_int,
    unpack_mask,
)
from ctp.compress.registry import compress_weight, needs_calibration, registered_methods
from ctp.errors import CTPError

OUT, IN, TOKENS, SEQS = 64, 128, 512, 4


def _inputs(n_in: int, seed: int) -> torch.Tensor:
    """(TOKENS, n_in) inputs with correlated channels and very unequal channel norms."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(n_in) + 0.3 * torch.randn(n_in, n_in, generator=g)  # (in, in)
    scales = torch.exp(torch.randn(n_in, generator=g))  # lognormal channel scales
    return (torch.randn(TOKENS, n_in, generator=g) @ mix) * scales


def _hessian(X: torch.Tensor) -> tuple[torch.Tensor, int]:
    return K.accumulate_hessian(None, 0, X.reshape(SEQS, -1, X.shape[1]))  # (SEQS, T, in)


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    W = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(0))
    X = _inputs(IN, seed=1)
    H, n = _hessian(X)
    return W, X, H, n


def out_err(W: torch.Tensor, W_new: torch.Tensor, X: torch.Tensor) -> float:
    """||W X - W' X||^2 in float64."""
    return float(((W.double() - W_new.double()) @ X.double().T).pow(2).sum())


def max_levels(W_new: torch.Tensor, g_idx: torch.Tensor) -> int:
    """Largest number of distinct values in any (row, group)."""
    worst = 0
    for k in g_idx.unique().tolist():
        vals = W_new[:, g_idx == k].sort(dim=1).values  # (out, group)
        distinct = 1 + (vals.diff(dim=1) != 0).sum(dim=1)  # (out,)
        worst = max(worst, int(distinct.max()))
    return worst


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def prune(method: str, W, H, n, sparsity=0.5, prune_n=0, prune_m=0, blocksize=128) -> K.KernelResult:
    if method == "magnitude":
        return K.magnitude_prune(W, sparsity, prune_n, prune_m)
    if method == "wanda":
        return K.wanda_prune(W, K.input_norms_from_hessian(H, n), sparsity, prune_n, prune_m)
    return K.sparsegpt(W, H, sparsity, prune_n, prune_m, blocksize=blocksize)


# --------------------------------------------------------------------------- Hessian


def test_accumulate_hessian_matches_direct_formula(data):
    _, X, H, n = data
    assert n == SEQS  # samples are sequences, as in the reference add_batch
    H_direct = 2 / SEQS * X.T @ X
    torch.testing.assert_close(H, H_direct, rtol=1e-4, atol=1e-3)
    # Streaming one sequence at a time gives the same running average.
    H_s, n_s = None, 0
    for seq in X.reshape(SEQS, -1, IN):
        H_s, n_s = K.accumulate_hessian(H_s, n_s, seq)  # (T, in) = one sample
    assert n_s == SEQS
    torch.testing.assert_close(H_s, H, rtol=1e-4, atol=1e-3)
    H_i, n_i = torch.zeros(IN, IN), 0
    H_o, n_o = torch.zeros(IN, IN), 0
    for seq in X.reshape(SEQS, -1, IN).split(2):  # (2, T, in) = two samples
        H_next, n_i = K.accumulate_hessian(H_i, n_i, seq, inplace=True)
        assert H_next is H_i
        H_o, n_o = K.accumulate_hessian(H_o, n_o, seq)
    assert n_i == SEQS
    torch.testing.assert_close(H_i, H, rtol=1e-4, atol=1e-3)
    assert torch.equal(H_i, H_o)  # in place is a memory saving only: the same values bit for bit
    # consuming the input (scaled in place, no copy) gives the same values bit for bit and overwrites x
    H_c, n_c = torch.zeros(IN, IN), 0
    for seq in X.reshape(SEQS, -1, IN).split(2):
        x = seq.clone()
        H_c, n_c = K.accumulate_hessian(H_c, n_c, x, inplace=True, consume=True)
        assert torch.equal(x, seq * math.sqrt(2 / n_c))  # x itself was scaled: no copy of it was made
    assert n_c == SEQS and torch.equal(H_c, H_o)
    torch.testing.assert_close(K.input_norms_from_hessian(H, n), X.pow(2).sum(0), rtol=1e-4, atol=1e-2)


def test_accumulate_hessian_in_bands(monkeypatch):
    """A wide in-place update goes a band of rows at a time (one band buffer beside H, not the whole X X^T) and
    gives the rows of the whole product: forced here to bands of 48 rows of a 200-wide H (the last band short)."""
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(2, 64, 200, generator=g) * torch.rand(200, generator=g) for _ in range(3)]
    whole, nw = torch.zeros(200, 200), 0
    for x in xs:
        whole, nw = K.accumulate_hessian(whole, nw, x, inplace=True)  # 200 <= 512 rows: one product
    monkeypatch.setattr(K, "_PRODUCT_ELEMENTS", 48 * 200)
    monkeypatch.setattr(K, "_PRODUCT_MIN_ROWS", 48)
    bands_seen = []
    real_mm = torch.mm

    def mm(a, b, out=None):
        bands_seen.append(a.shape[0])
        return real_mm(a, b, out=out)

    monkeypatch.setattr(K.torch, "mm", mm)
    H, n = torch.zeros(200, 200), 0
    for x in xs:
        H_next, n = K.accumulate_hessian(H, n, x, inplace=True)
        assert H_next is H
    assert n == nw == 6 and bands_seen == [48, 48, 48, 48, 8] * 3
    torch.testing.assert_close(H, whole, rtol=1e-6, atol=1e-6)  # a BLAS may round a narrower product apart
    direct = sum(2 / 6 * x.reshape(-1, 200).double().T @ x.reshape(-1, 200).double() for x in xs)
    torch.testing.assert_close(H.double(), direct, rtol=1e-5, atol=1e-4)


def test_reconstruction_error_is_scaled_output_error(data):
    W, X, H, n = data
    W2 = K.magnitude_prune(W, 0.5).weight
    assert K.reconstruction_error(W, W2, H) == pytest.approx(2 / n * out_err(W, W2, X), rel=1e-3)


# --------------------------------------------------------------------------- sparsity


@pytest.mark.parametrize("method", ["sparsegpt", "magnitude", "wanda"])
@pytest.mark.parametrize("sparsity", [0.5, 0.3, 0.9])
def test_unstructured_exact_row_sparsity(data, method, sparsity):
    W, _, H, n = data
    res = prune(method, W, H, n, sparsity)
    expected = round(sparsity * IN)
    assert (res.mask.sum(dim=1) == IN - expected).all()
    assert ((res.weight == 0).sum(dim=1) == expected).all()  # random W has no other zeros
    assert torch.equal(res.weight[~res.mask], torch.zeros(OUT * expected))
    assert not torch.signbit(res.weight[~res.mask]).any()  # +0.0, not -0.0
    assert res.stats["sparsity"] == pytest.approx(expected / IN)


def test_sparsegpt_exact_row_sparsity_with_partial_last_block():
    # 100 columns in blocks of 32 (32, 32, 32, 4): per-block quotas must add up exactly.
    X = _inputs(100, seed=2)
    H, _ = _hessian(X)
    W = torch.randn(16, 100, generator=torch.Generator().manual_seed(3))
    for sparsity in (0.3, 0.55, 0.77):
        res = K.sparsegpt(W, H, sparsity, blocksize=32)
        assert (res.mask.logical_not().sum(dim=1) == K.n_pruned(100, sparsity)).all()
        assert K.n_pruned(100, sparsity) == math.floor(100 * sparsity + 0.5)


@pytest.mark.parametrize("method", ["sparsegpt", "magnitude", "wanda"])
@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4)])
def test_nm_pattern_exact(data, method, nm):
    W, _, H, n = data
    prune_n, prune_m = nm
    res = prune(method, W, H, n, prune_n=prune_n, prune_m=prune_m)
    groups = res.weight.reshape(OUT, IN // prune_m, prune_m)  # (out, groups, M)
    assert ((groups != 0).sum(dim=-1) == prune_n).all()
    assert ((res.mask.reshape(OUT, IN // prune_m, prune_m)).sum(dim=-1) == prune_n).all()


def test_nm_width_must_tile():
    W = torch.randn(4, 10)
    with pytest.raises(CTPError, match="does not tile"):
        K.magnitude_prune(W, 0.5, 2, 4)


@pytest.mark.parametrize("nm", [(0, 0), (2, 4)])
def test_sparsegpt_and_wanda_beat_magnitude(data, nm):
    W, X, H, n = data
    e = {m: out_err(W, prune(m, W, H, n, 0.5, *nm).weight, X) for m in ("sparsegpt", "magnitude", "wanda")}
    assert e["sparsegpt"] < e["magnitude"]
    assert e["wanda"] < e["magnitude"]
    assert e["sparsegpt"] < e["wanda"]


# --------------------------------------------------------------------------- quantization


def _quantize(method, W, H, bits, group_size, act_order, sym=False) -> K.KernelResult:
    if method == "rtn":
        return K.rtn_quantize(W, bits, group_size, sym)
    return K.gptq(W, H, bits, group_size, sym, act_order)


QUANT_CASES = [
    ("gptq", bits, gs, act) for bits in (2, 3, 4, 8) for gs in (-1, 32) for act in (False, True)
] + [("rtn", bits, gs, False) for bits in (2, 3, 4, 8) for gs in (-1, 32)]


@pytest.mark.parametrize(("method", "bits", "group_size", "act_order"), QUANT_CASES)
def test_at_most_2_pow_bits_levels_per_group(data, method, bits, group_size, act_order):
    W, _, H, _ = data
    res = _quantize(method, W, H, bits, group_size, act_order, sym=bits == 3)
    n_groups = 1 if group_size == -1 else IN // group_size
    assert res.scale.shape == res.zero.shape == (OUT, n_groups)
    assert res.g_idx.shape == (IN,) and res.g_idx.dtype == torch.int32
    assert torch.equal(torch.bincount(res.g_idx.long()), torch.full((n_groups,), IN // n_groups))
    if act_order and group_size > 0:
        assert not torch.equal(res.g_idx, res.g_idx.sort().values)  # groups really are scattered
    assert int(res.codes.max()) < 2**bits
    assert max_levels(res.weight, res.g_idx) <= 2**bits
    # The integer payload rebuilds the weight bit for bit.
    g = res.g_idx.long()
    assert bitwise_equal(dequantize(res.codes, res.scale[:, g], res.zero[:, g]), res.weight)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [-1, 32])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn(data, bits, group_size, act_order):
    W, X, H, _ = data
    e_gptq = out_err(W, K.gptq(W, H, bits, group_size, act_order=act_order).weight, X)
    e_rtn = out_err(W, K.rtn_quantize(W, bits, group_size).weight, X)
    assert e_gptq < e_rtn


def test_group_size_must_divide_width(data):
    W, _, H, _ = data
    with pytest.raises(CTPError, match="group_size 48"):
        K.gptq(W, H, 4, 48)
    with pytest.raises(CTPError, match="group_size 48"):
        K.rtn_quantize(W, 4, 48)


# --------------------------------------------------------------------------- joint / sequential


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [-1, 32])
@pytest.mark.parametrize("nm", [(0, 0), (2, 4)])
def test_joint_sparsegpt_quant(data, bits, group_size, nm):
    W, X, H, n = data
    res = K.sparsegpt(W, H, 0.5, *nm, quant=(bits, group_size, False))
    assert (res.mask.sum(dim=1) == IN // 2).all()  # exact 50% per row
    if nm != (0, 0):
        assert (res.mask.reshape(OUT, -1, 4).sum(-1) == 2).all()
    assert (res.weight[~res.mask] == 0).all() and not torch.signbit(res.weight[~res.mask]).any()
    assert max_levels(res.weight, res.g_idx) <= 2**bits  # zero is one of the grid's levels
    g = res.g_idx.long()
    assert bitwise_equal(dequantize(res.codes, res.scale[:, g], res.zero[:, g]) * res.mask, res.weight)
    # Joint OBS beats the naive baseline recipe at the same budget.
    naive = K.rtn_quantize(K.magnitude_prune(W, 0.5, *nm).weight, bits, group_size)
    assert out_err(W, res.weight, X) < out_err(W, naive.weight * K.magnitude_prune(W, 0.5, *nm).mask, X)


def test_gptq_with_fixed_mask_keeps_it_and_beats_rtn(data):
    W, X, H, n = data
    pruned = K.wanda_prune(W, K.input_norms_from_hessian(H, n), 0.5)
    for act_order in (False, True):
        res = K.gptq(pruned.weight, H, 4, 32, act_order=act_order, mask=pruned.mask)
        assert torch.equal(res.mask, pruned.mask)
        assert (res.weight[~pruned.mask] == 0).all()
        rtn = K.rtn_quantize(pruned.weight, 4, 32, mask=pruned.mask)
        assert out_err(W, res.weight, X) < out_err(W, rtn.weight, X)


# --------------------------------------------------------------------------- registry


REBUILD_CONFIGS = [
    CompressConfig(quant=QuantConfig(bits=3, group_size=32, act_order=True)),
    CompressConfig(quant=QuantConfig(method="rtn", bits=4, sym=True)),
    CompressConfig(prune=PruneConfig(), quant=QuantConfig(bits=4, group_size=32)),  # joint
    CompressConfig(prune=PruneConfig(prune_n=2, prune_m=4), quant=QuantConfig(bits=3)),  # joint N:M
    CompressConfig(prune=PruneConfig(method="wanda"), quant=QuantConfig(bits=4, act_order=True)),
    CompressConfig(prune=PruneConfig(method="magnitude"), quant=QuantConfig(method="rtn", group_size=64)),
    CompressConfig(prune=PruneConfig(method="sparsegpt", sparsity=0.6)),
]


@pytest.mark.parametrize("cfg", REBUILD_CONFIGS, ids=lambda c: c.label())
def test_compressed_weight_rebuilds_bitwise(data, cfg, monkeypatch):
    W, X, H, n = data
    cw = compress_weight(W, H, n, cfg)
    assert cw.weight.dtype == W.dtype and cw.weight.shape == W.shape
    assert bitwise_equal(cw.rebuild(), cw.weight)
    if cw.quantized:
        g = cw.g_idx.long()
        rebuilt = dequantize(cw.codes, cw.scale[:, g], cw.zero[:, g])
        if cw.mask is not None:
            rebuilt = rebuilt * cw.mask
        assert bitwise_equal(rebuilt, cw.weight)
        monkeypatch.setattr(weight_module, "_REBUILD_ELEMENTS", 3 * IN + 1)  # by 3 rows, a shorter last step
        assert bitwise_equal(cw.rebuild(), cw.weight)
        assert cw.bits == cfg.quant.bits and int(cw.codes.max()) < 2**cw.bits
    if cfg.prune is not None:
        k = K.n_pruned(IN, cfg.prune.sparsity)
        assert (cw.mask.logical_not().sum(dim=1) == k).all()
        assert cw.stats["sparsity"] == pytest.approx(k / IN)
    assert cw.stats["recon_error"] == pytest.approx(2 / n * out_err(W, cw.weight, X), rel=1e-3)


def test_compress_weight_keeps_half_precision_dtype(data):
    W, _, H, n = data
    cw = compress_weight(W.half(), H, n, CompressConfig(prune=PruneConfig(), quant=QuantConfig(group_size=32)))
    assert cw.weight.dtype == torch.float16
    assert torch.equal(cw.rebuild().half(), cw.weight)


def test_registry_holds_the_built_in_methods():
    assert registered_methods() == (("sparsegpt", "magnitude", "wanda"), ("gptq", "rtn"))


def test_a_registered_method_is_accepted_by_the_configs_and_runs(data, monkeypatch):
    """Configs validate against the method table: registering a pruner is all a new method needs."""
    from ctp.compress import methods

    W, _, H, n = data
    with pytest.raises(CTPError, match="unknown prune method 'every-other'"):
        PruneConfig(method="every-other")
    monkeypatch.setattr(methods, "PRUNERS", dict(methods.PRUNERS))  # the registration ends with the test
    monkeypatch.setattr(methods, "DATA_FREE", set(methods.DATA_FREE))

    @methods.register_pruner("every-other", data_free=True)
    def every_other(W, H, n, cfg):
        keep = torch.ones_like(W, dtype=torch.bool)
        keep[:, ::2] = False
        return K.CompressedWeight(weight=W * keep, mask=keep, stats={"sparsity": 0.5})

    cfg = CompressConfig.from_dict({"prune": {"method": "every-other", "sparsity": 0.5}})
    assert not needs_calibration(cfg) and not cfg.joint
    cw = compress_weight(W, None, 0, cfg)
    assert torch.equal(cw.weight[:, ::2], torch.zeros_like(W[:, ::2])) and cw.stats["sparsity"] == 0.5
    # with a quantizer it runs in sequence (no joint recipe for the pair): the mask is held through GPTQ
    both = compress_weight(W, H, n, CompressConfig(prune=cfg.prune, quant=QuantConfig(group_size=32)))
    assert not both.weight[:, ::2].any() and both.quantized


def test_compress_weight_checks_width(data):
    W, _, H, n = data
    with pytest.raises(CTPError, match="group_size 96"):
        compress_weight(W, H, n, CompressConfig(quant=QuantConfig(group_size=96)))


# --------------------------------------------------------------------------- singular Hessians


def test_dead_inputs_are_handled(data):
    W, X, _, _ = data
    X = X.clone()
    dead = torch.tensor([3, 40, 41, 100])
    X[:, dead] = 0  # channels that never fire: H is singular
    H, n = _hessian(X)
    sp = K.sparsegpt(W, H, 0.5)
    q = K.gptq(W, H, 4, 32, act_order=True)
    for res in (sp, q):
        assert torch.isfinite(res.weight).all()
        assert (res.weight[:, dead] == 0).all()
        assert res.stats["dead_inputs"] == len(dead)
    assert (sp.mask.sum(dim=1) == IN // 2).all()
    assert out_err(W, q.weight, X) < out_err(W, K.rtn_quantize(W, 4, 32).weight, X)


@pytest.mark.parametrize("n", [7, 300, 600])  # one band, a short last band, several bands of 256 rows
def test_inverse_factor_in_place_equals_torchs_copying_calls(n):
    """``_chol_inv_upper_`` runs the three LAPACK calls on H's column-major view when H is symmetric bit for bit,
    then transposes by bands: the same bits as torch's calls on a row-major H (which each work in a copy), here
    checked against them out of place. A not quite symmetric H takes the row-major calls themselves."""
    g = torch.Generator().manual_seed(n)
    X = torch.randn(2 * n, n, generator=g) * torch.rand(n, generator=g)
    H = X.T @ X / n
    H = (H + H.T) / 2  # symmetric bit for bit on any BLAS (X^T X alone is not on every CPU: a + b == b + a is)
    H.diagonal().add_(0.01 * float(H.diagonal().mean()))
    assert K._symmetric(H)
    want = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    got = H.clone()
    assert K._chol_inv_upper_(got) is got
    assert torch.equal(got, want) and torch.equal(got, got.triu())
    skew = H.clone()
    skew[0, n - 1] = torch.nextafter(skew[0, n - 1], torch.tensor(1.0))  # one bit off symmetric
    assert not K._symmetric(skew)
    want = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(skew)), upper=True)
    got = skew.clone()
    assert torch.equal(K._chol_inv_upper_(got), want)
    A = torch.arange(float(n * n)).reshape(n, n)
    assert torch.equal(K._transpose_(A.clone()), A.T)


def test_cholesky_failure_retries_with_more_damping_and_warns():
    # Positive diagonal but indefinite: needs damping > 2 * mean(diag H).
    H = torch.eye(16)
    H[0, 1] = H[1, 0] = 3.0  # eigenvalues -2 and 4
    W = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    H0 = H.clone()
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        res = K.gptq(W, H, 4, blocksize=8)
    assert torch.isfinite(res.weight).all()
    assert res.stats["damp"] > 1
    assert torch.equal(H, H0)  # the caller's Hessian is left as it was
    # each retry dampens the undamped Hessian afresh: the same result as that dampening from the start
    direct = K.gptq(W, H, 4, blocksize=8, percdamp=res.stats["damp"])
    assert torch.equal(direct.weight, res.weight) and direct.stats["damp"] == res.stats["damp"]


def test_a_lent_hessian_is_factored_in_place_and_restored_with_the_same_result(data, monkeypatch):
    """A lent H (LentHessian) is factored where it lies: the OBS loop then reads H's own memory, one (in, in)
    matrix less, and restore() puts every value back; the result is the copying path's bit for bit, on the
    retry path too (an indefinite H: the first, in-place attempt fails and H is restored before the next)."""
    W, _, H, n = data
    for h in (H, _indefinite(W.shape[1])):
        lent = K.LentHessian.of(h)
        assert lent is not None and lent.H is h
        h0 = h.clone()
        seen = []
        real = K._obs_compress

        def spy(Wk, hinv, *a, **kw):
            seen.append(hinv.untyped_storage().data_ptr() == h.untyped_storage().data_ptr())
            return real(Wk, hinv, *a, **kw)

        with pytest.MonkeyPatch.context() as m:
            m.setattr(K, "_obs_compress", spy)
            if h is H:
                got = K.gptq(W, h, 4, 32, lent=lent)
            else:
                with pytest.warns(RuntimeWarning, match="not positive definite"):
                    got = K.gptq(W, h, 4, 32, lent=lent)
        assert seen == [h is H]  # factored in place, unless a retry needed a fresh copy
        lent.restore()
        assert torch.equal(h, h0) and torch.equal(torch.signbit(h), torch.signbit(h0))
        want = K.gptq(W, h, 4, 32) if h is H else K.gptq(W, h, 4, 32, percdamp=got.stats["damp"])
        assert torch.equal(got.weight, want.weight) and torch.equal(got.codes, want.codes)
    assert K.LentHessian.of(H + torch.triu(torch.full_like(H, 1e-3), 1)) is None  # not symmetric: not lent
    # through the registry: the same payload and statistics, H intact on return
    import ctp.compress.registry as R

    monkeypatch.setattr(R, "LEND_MIN_BYTES", 0)  # this H is small
    lent_calls = []
    monkeypatch.setattr(K.LentHessian, "restore", lambda self, real=K.LentHessian.restore: lent_calls.append(1)
                        or real(self))
    for cfg in [*REBUILD_CONFIGS, CompressConfig(quant=QuantConfig(bits=4, group_size=32))]:
        h0 = H.clone()
        a, b = compress_weight(W, H, n, cfg), compress_weight(W, H, n, cfg, lend_h=True)
        assert torch.equal(a.weight, b.weight) and a.stats == b.stats and torch.equal(H, h0), cfg.label()
    assert len(lent_calls) == 4  # lent to the one-kernel OBS recipes without act-order: gptq, sparsegpt, 2 joint


def _indefinite(n: int) -> Tensor:
    H = torch.eye(n)
    H[0, 1] = H[1, 0] = 3.0  # eigenvalues -2 and 4: needs damping > 2 * mean(diag H)
    return H


def test_hopeless_hessian_raises_ctperror():
    H = torch.full((8, 8), float("nan"))
    with pytest.raises(CTPError, match="not positive definite"):
        K.prepare_hessian(H, 0.01)


# --------------------------------------------------------------------------- quantizer math


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_quant_params_grid(bits, sym):
    maxq = 2**bits - 1
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(bits))
    w[1] = 0  # all-zero row
    w[2] = w[2].abs()  # no negative value
    w[3] = 1e-44  # a few subnormals
    scale, zero = quant_params(w, bits, sym)
    assert scale.shape == zero.shape == (6, 1)
    assert (scale > 0).all() and torch.isfinite(scale).all()
    assert ((zero >= 0) & (zero <= maxq) & (zero == zero.round())).all()
    if sym:
        assert (zero == 2 ** (bits - 1)).all()
    # 0 is exactly representable, and the rounding error is at most a step (clipping aside).
    assert (dequantize(quantize_int(torch.zeros(6, 1), scale, zero, maxq), scale, zero) == 0).all()
    q = quantize_int(w, scale, zero, maxq)
    assert q.dtype == torch.uint8 and int(q.max()) <= maxq
    err = (dequantize(quantize_int(w, scale, zero, maxq), scale, zero) - w).abs()
    assert (err[[0, 4, 5]] <= scale[[0, 4, 5]] * (1 if sym else 0.5) + 1e-6).all()


# --------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("numel", [0, 1, 7, 8, 9, 13, 1001])
def test_pack_unpack_round_trip(bits, numel):
    codes = torch.randint(0, 2**bits, (numel,), dtype=torch.uint8, generator=torch.Generator().manual_seed(numel))
    packed = pack_int(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(numel * bits / 8)
    assert torch.equal(unpack_int(packed, bits, numel), codes)


@pytest.mark.parametrize("bits", [1, 3, 4, 7])
def test_pack_by_steps_gives_the_same_stream(bits, monkeypatch):
    """Packing and unpacking go a bounded number of values at a time; the stream is the one the whole-tensor
    formula gives (each 8-value group packs on its own), for a shorter last step and padding too."""
    from ctp.compress import quant

    numel = 8 * 23 + 5
    codes = torch.randint(0, 2**bits, (numel,), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    v = torch.cat([codes, codes.new_zeros(3)]).to(torch.int64).view(-1, 8)
    acc = (v << (torch.arange(8) * bits)).sum(dim=1)
    whole = ((acc[:, None] >> (torch.arange(bits) * 8)) & 0xFF).to(torch.uint8).reshape(-1)[: math.ceil(numel * bits / 8)]
    monkeypatch.setattr(quant, "_PACK_GROUPS", 5)  # 5 groups of 8 values per step: 5 steps
    packed = pack_int(codes, bits)
    assert torch.equal(packed, whole)
    assert torch.equal(unpack_int(packed, bits, numel), codes)


def test_pack_layout_is_lsb_first_bit_stream():
    # 3-bit codes 1, 2, 3 -> stream 100 010 110 (LSB first) -> bytes 0b11010001, 0b0.
    packed = pack_int(torch.tensor([1, 2, 3], dtype=torch.uint8), 3)
    assert packed.tolist() == [0b11010001, 0]
    codes = torch.arange(16, dtype=torch.uint8).reshape(4, 4)
    assert torch.equal(unpack_int(pack_int(codes, 4), 4, 16).reshape(4, 4), codes)  # any shape in


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match="exceeds 7"):
        pack_int(torch.tensor([8], dtype=torch.uint8), 3)


@pytest.mark.parametrize("numel", [1, 5, 64, 1003])
def test_mask_round_trip(numel):
    mask = torch.rand(numel, generator=torch.Generator().manual_seed(numel)) > 0.5
    packed = pack_mask(mask)
    assert packed.numel() == math.ceil(numel / 8)
    assert torch.equal(unpack_mask(packed, numel), mask)


# --------------------------------------------------------------------------- properties


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 6),
    cols=st.integers(2, 40),
    sparsity=st.floats(0.01, 0.99),
    seed=st.integers(0, 2**16),
    wanda=st.booleans(),
)
def test_property_baseline_sparsity_is_exact(rows, cols, sparsity, seed, wanda):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    if wanda:
        res = K.wanda_prune(W, torch.rand(cols, generator=g), sparsity)
    else:
        res = K.magnitude_prune(W, sparsity)
    k = math.floor(sparsity * cols + 0.5)
    assert ((~res.mask).sum(dim=1) == k).all()
    assert torch.equal(res.weight, W * res.mask)


@settings(max_examples=25, deadline=None)
@given(bits=st.integers(1, 8), numel=st.integers(0, 300), seed=st.integers(0, 2**16))
def test_property_pack_round_trip(bits, numel, seed):
    codes = torch.randint(0, 2**bits, (numel,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(unpack_int(pack_int(codes, bits), bits, numel), codes)


def test_sq_norms_are_the_hessian_diagonal():
    g = torch.Generator().manual_seed(3)
    H, n, d, m = None, 0, None, 0
    for shape in [(2, 7, 16), (16,), (5, 16), (1, 3, 4, 16)]:  # batches of samples, one sample, ...
        x = torch.randn(*shape, generator=g)
        H, n = K.accumulate_hessian(H, n, x)
        d, m = K.accumulate_sq_norms(d, m, x)
    assert m == n and d.shape == (16,)
    torch.testing.assert_close(d, torch.diagonal(H), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(K.input_norms_from_hessian(d, n), K.input_norms_from_hessian(H, n))
    W, W2 = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    assert K.reconstruction_error(W, W2, d) == pytest.approx(K.reconstruction_error(W, W2, torch.diag(d)), rel=1e-5)
