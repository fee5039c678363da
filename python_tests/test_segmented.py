"""The segmented multi-adapter op (``ops.segmented_adapter``): several CSR adapters over one batch, one per
segment of its rows, against the plain-PyTorch reference in float64 (the suite's 2x rule) on fresh random
inputs: every dtype, int32 and int16 columns, every CPU ISA tier, every activation, odd shapes, empty segments,
empty weight rows, 0% and 99% sparsity, rows no adapter touches; gradients; opcheck; torch.compile; clear
errors for bad input, an out-of-range index caught without reading outside the tile."""
import threading

import pytest
import torch

from sparseadapter_kernels import ops, reference
from sparseadapter_kernels.backends import backend_usable

from conftest import assert_kernel_close, random_sparse, randn

pytestmark = pytest.mark.skipif(not backend_usable("cpu"), reason="the CPU extension is not built")
LIB = torch.ops.sparseadapter_kernels
DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def isas():
    """The kernel ISA tiers this CPU and build can run (SAK_CPU_ISA refuses the others)."""
    import os

    have = []
    if not backend_usable("cpu"):
        return have
    for isa in ("generic", "avx2", "avx512", "avx512bf16"):
        os.environ["SAK_CPU_ISA"] = isa
        try:
            LIB.cpu_isa(torch.float32)
            have.append(isa)
        except RuntimeError:
            pass
        finally:
            del os.environ["SAK_CPU_ISA"]
    return have


def make_case(dtype, d=50, d_out=45, rs=(3, 8, 17, 1), sparsity=0.7, n=61, seg_sizes=(1, 9, 0, 20), seed=0,
              col_dtype=torch.int32, biases=True, residual=True, empty_rows=0):
    """(args of ops.segmented_adapter as keywords, the float64 twin of the same keywords)."""
    g = torch.Generator().manual_seed(seed)
    downs = [random_sparse((r, d), sparsity, dtype, generator=g, empty_rows=min(empty_rows, r - 1))[0] for r in rs]
    ups = [random_sparse((d_out, r), sparsity, dtype, generator=g, empty_rows=empty_rows)[0] for r in rs]
    m = sum(seg_sizes)
    rows = torch.randperm(n, generator=g)[:m]
    seg_ptr = torch.tensor([0, *torch.tensor(seg_sizes).cumsum(0).tolist()])
    kw = dict(x=randn(n, d, dtype=dtype, generator=g), rows=rows, seg_ptr=seg_ptr,
              down_values=[w.values for w in downs], down_crow_indices=[w.crow_indices for w in downs],
              down_col_indices=[w.col_indices.to(col_dtype) for w in downs], up_values=[w.values for w in ups],
              up_crow_indices=[w.crow_indices for w in ups], up_col_indices=[w.col_indices.to(col_dtype) for w in ups],
              down_bias=[randn(r, dtype=dtype, generator=g) if biases and i % 2 == 0 else None for i, r in enumerate(rs)],
              up_bias=[randn(d_out, dtype=dtype, generator=g) if biases and i % 2 == 1 else None for i in range(len(rs))],
              scales=[1.0, 0.5, -2.0, 4.0][:len(rs)], residual=randn(n, d_out, dtype=dtype, generator=g) if residual
              else None, d_out=d_out)
    return kw, _to(kw, torch.float64)


def _to(kw, dtype):
    def conv(v):
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.to(dtype)
        if isinstance(v, list):
            return [conv(t) for t in v]
        return v
    return {k: conv(v) for k, v in kw.items()}


def check(kw, kw64, activation, what=""):
    dtype = kw["x"].dtype
    got = ops.segmented_adapter(**kw, activation=activation, backend="cpu")
    oracle = ops.segmented_adapter(**kw64, activation=activation, backend="reference")
    lowp = ops.segmented_adapter(**kw, activation=activation, backend="reference")
    assert_kernel_close(got, oracle, dtype, lowp=lowp, what=what or f"segmented {activation}")
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("col_dtype", (torch.int32, torch.int16))
@pytest.mark.parametrize("activation", ("relu", "gelu", "silu", "identity"))
def test_matches_reference(dtype, col_dtype, activation):
    kw, kw64 = make_case(dtype, col_dtype=col_dtype, seed=hash((str(dtype), str(col_dtype), activation)) % 1000)
    got = check(kw, kw64, activation)
    untouched = torch.ones(kw["x"].shape[0], dtype=torch.bool)
    untouched[kw["rows"]] = False
    assert torch.equal(got[untouched], kw["residual"][untouched])  # rows of no adapter: the residual, bit-exact


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_every_isa_tier(monkeypatch, isa, dtype):
    monkeypatch.setenv("SAK_CPU_ISA", isa)
    kw, kw64 = make_case(dtype, seed=3, seg_sizes=(5, 40, 16, 0))  # segments longer than a tile, partial tiles
    check(kw, kw64, "silu", what=f"{isa}")


@pytest.mark.parametrize("sparsity", (0.0, 0.99))
@pytest.mark.parametrize("shape", ((1, 1, (1,)), (7, 130, (2, 33)), (300, 5, (64, 1))))
def test_shapes_and_sparsities(sparsity, shape):
    d, d_out, rs = shape
    kw, kw64 = make_case(torch.float32, d=d, d_out=d_out, rs=rs, sparsity=sparsity, n=23,
                         seg_sizes=(1, 17)[:len(rs)], empty_rows=1, seed=7)
    check(kw, kw64, "relu")


def test_no_residual_and_no_segments():
    kw, kw64 = make_case(torch.float32, residual=False, seed=5)
    got = check(kw, kw64, "gelu")
    untouched = torch.ones(kw["x"].shape[0], dtype=torch.bool)
    untouched[kw["rows"]] = False
    assert torch.equal(got[untouched], torch.zeros_like(got[untouched]))
    x = randn(4, 6)
    empty = ops.segmented_adapter(x, torch.zeros(0, dtype=torch.long), torch.zeros(1, dtype=torch.long), [], [], [],
                                  [], [], [], residual=randn(4, 3, seed=2), backend="cpu")
    assert torch.equal(empty, randn(4, 3, seed=2))
    assert ops.segmented_adapter(x[:0], torch.zeros(0, dtype=torch.long), torch.zeros(1, dtype=torch.long), [], [],
                                 [], [], [], [], d_out=3, backend="cpu").shape == (0, 3)


def test_nan_stays_in_its_row():
    kw, kw64 = make_case(torch.float32, seed=9)
    nan_row = int(kw["rows"][3])
    kw["x"] = kw["x"].clone()
    kw["x"][nan_row, 0] = float("nan")
    out = ops.segmented_adapter(**kw, activation="relu", backend="cpu")
    col0 = kw["down_col_indices"]
    assert out[nan_row].isnan().any() or all(c.numel() == 0 for c in col0)
    others = torch.ones(out.shape[0], dtype=torch.bool)
    others[nan_row] = False
    assert not out[others].isnan().any()


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_gradients(dtype):
    kw, kw64 = make_case(dtype, seed=11)
    names = ["x", "residual", "down_values", "up_values", "down_bias", "up_bias"]

    def leaves(k):
        out = []
        for n in names:
            v = k[n]
            for t in (v if isinstance(v, list) else [v]):
                if t is not None:
                    t.requires_grad_(True)
                    out.append(t)
        return out

    kw = {k: ([t.detach().clone() if isinstance(t, torch.Tensor) else t for t in v] if isinstance(v, list)
              else v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    lk, l64 = leaves(kw), leaves(kw64)
    g_out = randn(*kw["residual"].shape, dtype=dtype, seed=4)
    unused = dict(allow_unused=True, materialize_grads=True)  # the adapter of the empty segment
    got = torch.autograd.grad(ops.segmented_adapter(**kw, activation="silu", backend="cpu"), lk, g_out, **unused)
    want = torch.autograd.grad(ops.segmented_adapter(**kw64, activation="silu", backend="reference"), l64,
                               g_out.double(), **unused)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_kernel_close(a, b, dtype, scale=4.0, what=f"gradient {i}")


def test_opcheck():
    kw, _ = make_case(torch.float32, seed=13, rs=(3, 5), seg_sizes=(4, 6))
    none = torch.empty(0)  # the op's "no bias"
    down_bias, up_bias = ([none if b is None else b for b in kw[k]] for k in ("down_bias", "up_bias"))
    args = (kw["x"], kw["residual"], kw["rows"], kw["seg_ptr"], kw["down_values"], kw["down_crow_indices"],
            kw["down_col_indices"], down_bias, kw["up_values"], kw["up_crow_indices"], kw["up_col_indices"],
            up_bias, kw["scales"], "relu", kw["d_out"])
    torch.library.opcheck(LIB.segmented_adapter.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_torch_compile_fullgraph():
    kw, kw64 = make_case(torch.float32, seed=17)

    def f(x):
        return ops.segmented_adapter(**dict(kw, x=x), activation="relu", backend="cpu")

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(kw["x"])
    assert torch.equal(got, f(kw["x"]))


def test_threads_share_adapters():
    kw, kw64 = make_case(torch.float32, seed=19)
    want = ops.segmented_adapter(**kw, activation="relu", backend="cpu")
    outs, barrier = [], threading.Barrier(4)

    def run():
        barrier.wait()
        for _ in range(20):
            outs.append(torch.equal(ops.segmented_adapter(**kw, activation="relu", backend="cpu"), want))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(outs) == 80 and all(outs)


def _bad(kw, **change):
    out = dict(kw)
    out.update(change)
    return out


def test_errors_name_the_argument():
    kw, _ = make_case(torch.float32, seed=23)
    n = kw["x"].shape[0]
    cases = [
        (_bad(kw, rows=kw["rows"].clone().index_fill_(0, torch.tensor([1]), int(kw["rows"][0]))), "rows: expected distinct"),
        (_bad(kw, rows=kw["rows"].clone().index_fill_(0, torch.tensor([1]), n)), r"rows: expected rows of x in \[0, 61\)"),
        (_bad(kw, rows=kw["rows"].int()), "rows: expected a contiguous 1-D int64"),
        (_bad(kw, seg_ptr=torch.tensor([0, 5, 3, 20, 30])), "seg_ptr: expected a non-decreasing"),
        (_bad(kw, seg_ptr=torch.tensor([0, 1, 10, 10, 29])), "seg_ptr: expected entries from 0 to 30"),
        (_bad(kw, scales=[1.0]), r"scales: expected one entry per segment \(4\)"),
        (_bad(kw, down_values=[kw["down_values"][0].double()] + kw["down_values"][1:]), r"down_values\[0\]: expected dtype"),
        (_bad(kw, up_crow_indices=[kw["up_crow_indices"][0][:-1]] + kw["up_crow_indices"][1:]),
         r"up_crow_indices\[0\]: expected 46 entries"),
        (_bad(kw, down_col_indices=[kw["down_col_indices"][0].short()] + kw["down_col_indices"][1:]),
         r"up_col_indices\[0\]: expected dtype Short \(int32 or int16, both projections of an adapter alike\), got Int"),
        (_bad(kw, residual=kw["residual"][:, :3]), r"residual: expected shape \[61, 45\]"),
        (_bad(kw, up_bias=[torch.zeros(3)] + kw["up_bias"][1:]), r"up_bias\[0\]: expected shape \[45\]"),
    ]
    for bad, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            ops.segmented_adapter(**bad, activation="relu", backend="cpu")
    with pytest.raises(RuntimeError, match="activation: expected one of"):
        none = torch.empty(0)
        LIB.segmented_adapter(kw["x"], None, kw["rows"], kw["seg_ptr"], kw["down_values"], kw["down_crow_indices"],
                              kw["down_col_indices"], [none] * 4, kw["up_values"], kw["up_crow_indices"],
                              kw["up_col_indices"], [none] * 4, kw["scales"], "tanh", 45)
    with pytest.raises(NotImplementedError, match="backend='cuda' has no segmented kernel yet"):
        ops.segmented_adapter(**kw, backend="cuda")


@pytest.mark.parametrize("which", ("down", "up"))
@pytest.mark.parametrize("value", (-1, 10**6))
def test_out_of_range_column_is_caught(which, value):
    kw, _ = make_case(torch.float32, seed=29)
    cols = [c.clone() for c in kw[f"{which}_col_indices"]]
    cols[1][0] = value
    with pytest.raises(RuntimeError, match="a column index is out of range"):
        ops.segmented_adapter(**_bad(kw, **{f"{which}_col_indices": cols}), activation="relu", backend="cpu")
    ops.segmented_adapter(**kw, activation="relu", backend="cpu")  # the process and the op still work


def test_int16_columns_refuse_wide_inputs():
    x = torch.zeros(2, 40000)
    crow = torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="int16 column indices address at most 32767 features"):
        ops.segmented_adapter(x, torch.tensor([0]), torch.tensor([0, 1]), [torch.ones(1)], [crow],
                              [torch.zeros(1, dtype=torch.int16)], [torch.ones(1)], [crow],
                              [torch.zeros(1, dtype=torch.int16)], backend="cpu")


def test_reference_is_the_fallback_off_cpu_kernels():
    kw, kw64 = make_case(torch.float64, seed=31)
    got = ops.segmented_adapter(**kw, backend="reference")
    want = reference.segmented_adapter(*(kw[k] for k in ("x", "residual", "rows", "seg_ptr", "down_values",
                                                         "down_crow_indices", "down_col_indices", "down_bias",
                                                         "up_values", "up_crow_indices", "up_col_indices", "up_bias",
                                                         "scales")), "relu", kw["d_out"])
    assert torch.equal(got, want)


def lengths(crow):
    """int16 row lengths of int32 row pointers (the compact storage of the adapter pool)."""
    return (crow[1:] - crow[:-1]).to(torch.int16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_int16_row_lengths(dtype):
    kw, kw64 = make_case(dtype, col_dtype=torch.int16, seed=37, empty_rows=2)
    for k in (kw, kw64):
        for which in ("down", "up"):
            k[f"{which}_crow_indices"] = [lengths(c) for c in k[f"{which}_crow_indices"]]
    check(kw, kw64, "relu", what="int16 row lengths")
    if dtype == torch.float64:  # gradients through the per-segment backward with row lengths
        v = [t.clone().requires_grad_(True) for t in kw["down_values"]]
        got = torch.autograd.grad(ops.segmented_adapter(**dict(kw, down_values=v), backend="cpu").sum(), v,
                                  allow_unused=True, materialize_grads=True)
        want = torch.autograd.grad(ops.segmented_adapter(**dict(kw, down_values=v), backend="reference").sum(), v,
                                   allow_unused=True, materialize_grads=True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


def test_bad_row_lengths_are_refused():
    kw, _ = make_case(torch.float32, seed=41)
    bad = [lengths(c) for c in kw["down_crow_indices"]]
    bad[0] = bad[0].clone()
    bad[0][0] += 1
    with pytest.raises(RuntimeError, match=r"down_crow_indices\[0\]: expected row lengths summing to"):
        ops.segmented_adapter(**_bad(kw, down_crow_indices=bad), backend="cpu")
    bad[0][0] = -1
    with pytest.raises(RuntimeError, match=r"expected row lengths >= 0"):
        ops.segmented_adapter(**_bad(kw, down_crow_indices=bad), backend="cpu")
