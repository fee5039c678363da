"""Every CUDA kernel op of sparseadapter_kernels called once, for ``compute-sanitizer --tool memcheck``.

``make gpu-check`` runs it under memcheck (step ``memcheck``, docs/gpu_check.md)::

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 3 \\
        python tools/gpu_check_ops.py --device cuda --json OUT/memcheck/ops.json

Each op (``torch.ops.sparseadapter_kernels.*``: CSR/BSR spmm with and without the transpose ``perm``, CSR/BSR
SDDMM, CSR/BSR linear forward and backward, the fused adapter forward and backward on its tensor-core
path (f16/bf16, r <= 128) and its CUDA-core path (fp32, or r > 128), CSR and BSR) runs once on small,
odd shapes (several blocks per grid, partial tiles, empty rows); its outputs are checked against the
float64 reference on the CPU, loosely (this is a memory check, not the correctness suite). Inputs are
made on the CPU and copied, so few torch kernels run besides ours. ``--device cpu`` runs the same calls
on the CPU kernels (the dry run proves the script). Exit status: 0 all ran and matched, 1 a mismatch,
2 the CUDA kernels are not usable here. A call that
raises is recorded and the rest still run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the package of this checkout

# loose bounds on ||out - ref|| / ||ref|| (the reference is float64)
REL_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _weight(shape, sparsity, dtype, layout="csr", block=None, seed=0, empty_rows=1):
    import sparseadapter_kernels as sak

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, dtype=torch.float64, generator=g).to(dtype)
    if layout == "csr":
        mask = torch.rand(shape, generator=g) >= sparsity
        mask[:empty_rows] = False
    else:
        bh, bw = block
        blocks = torch.rand(shape[0] // bh, shape[1] // bw, generator=g) >= sparsity
        blocks[:empty_rows] = False
        mask = blocks.repeat_interleave(bh, 0).repeat_interleave(bw, 1)
    return sak.SparseWeight.from_dense(w, mask, layout=layout, block_size=block)


def _rand(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float64, generator=g).to(dtype)


def _fwd_args(down, up, db, ub):
    return (down.values, down.crow_indices, down.col_indices, down.t_crow_indices, down.t_row_indices, down.t_perm,
            db, up.values, up.crow_indices, up.col_indices, up.t_crow_indices, up.t_row_indices, up.t_perm, ub)


def _bwd_args(down, up):
    return (down.values, down.crow_indices, down.col_indices, down.t_crow_indices, down.t_row_indices, down.t_perm,
            up.values, up.crow_indices, up.col_indices, up.t_crow_indices, up.t_row_indices, up.t_perm)


def _to(args, device):
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


def _f64(args):
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def cases(device: str = "cuda"):
    """(name, dtype, fn(device) -> outputs, reference() -> outputs in float64 on the CPU). The CPU kernels have no
    float16: on ``device="cpu"`` those calls run in bfloat16."""
    from sparseadapter_kernels import reference as ref

    half = torch.float16 if device == "cuda" else torch.bfloat16

    lib = torch.ops.sparseadapter_kernels
    out = []
    n = 203  # not a multiple of any tile
    # --- products: CSR fp32 / bf16, BSR bf16 / fp32 -------------------------------------------------
    for layout, block, dtype in (("csr", None, torch.float32), ("csr", None, torch.bfloat16),
                                 ("bsr", (16, 16), torch.bfloat16), ("bsr", (8, 24), torch.float32)):
        w = _weight((48, 336), 0.7, dtype, layout, block, seed=1)
        x, dy = _rand(n, 336, dtype=dtype, seed=2), _rand(n, 48, dtype=dtype, seed=3)
        spmm = lib.csr_spmm if layout == "csr" else lib.bsr_spmm
        rspmm = ref.csr_spmm if layout == "csr" else ref.bsr_spmm
        tag = f"{layout}{'' if block is None else f'{block[0]}x{block[1]}'}"
        v64 = w.values.double()

        def fwd(dev, w=w, x=x, spmm=spmm):
            return (spmm(x.to(dev), w.values.to(dev), w.crow_indices.to(dev), w.col_indices.to(dev), None),)

        def dx(dev, w=w, dy=dy, spmm=spmm):
            return (spmm(dy.to(dev), w.values.to(dev), w.t_crow_indices.to(dev), w.t_row_indices.to(dev),
                         w.t_perm.to(dev)),)

        def sddmm(dev, w=w, x=x, dy=dy, layout=layout):
            if layout == "csr":
                return (lib.csr_sddmm(dy.to(dev), x.to(dev), w.crow_indices.to(dev), w.col_indices.to(dev)),)
            return (lib.bsr_sddmm(dy.to(dev), x.to(dev), w.crow_indices.to(dev), w.col_indices.to(dev),
                                  *w.block_size),)

        def linear(dev, w=w, x=x, dy=dy, layout=layout):
            lin = lib.csr_linear if layout == "csr" else lib.bsr_linear
            xl = x.to(dev).requires_grad_(True)
            vl = w.values.to(dev).requires_grad_(True)
            y = lin(xl, vl, *(t.to(dev) for t in (w.crow_indices, w.col_indices, w.t_crow_indices, w.t_row_indices,
                                                   w.t_perm)))
            gx, gv = torch.autograd.grad(y, (xl, vl), dy.to(dev))
            return y.detach(), gx, gv

        out += [
            (f"{layout}_spmm {tag} {_name(dtype)}", dtype, fwd,
             lambda w=w, x=x, rspmm=rspmm, v64=v64: (rspmm(x.double(), v64, w.crow_indices, w.col_indices),)),
            (f"{layout}_spmm perm (dx) {tag} {_name(dtype)}", dtype, dx,
             lambda w=w, dy=dy, rspmm=rspmm, v64=v64: (rspmm(dy.double(), v64, w.t_crow_indices, w.t_row_indices,
                                                               w.t_perm),)),
            (f"{layout}_sddmm {tag} {_name(dtype)}", dtype, sddmm,
             lambda w=w, x=x, dy=dy, v64=v64: (ref.sddmm(dy.double(), x.double(), v64, w.crow_indices,
                                                         w.col_indices),)),
            (f"{layout}_linear fwd+bwd {tag} {_name(dtype)}", dtype, linear,
             lambda w=w, x=x, dy=dy, rspmm=rspmm, v64=v64: (
                 rspmm(x.double(), v64, w.crow_indices, w.col_indices),
                 rspmm(dy.double(), v64, w.t_crow_indices, w.t_row_indices, w.t_perm),
                 ref.sddmm(dy.double(), x.double(), v64, w.crow_indices, w.col_indices))),
        ]
    # --- fused adapter: tensor-core path (bf16/fp16, r <= 128) and CUDA-core path (fp32; r > 128) ----------
    for layout, block, dtype, d, r, act, residual, bias, add_grad_out in (
            ("csr", None, torch.bfloat16, 320, 64, "gelu", True, True, True),
            ("csr", None, torch.float32, 200, 24, "relu", False, False, False),
            ("csr", None, half, 192, 192, "silu", True, True, False),
            ("bsr", (16, 16), torch.bfloat16, 320, 64, "silu", True, True, True),
            ("bsr", (8, 16), torch.float32, 96, 32, "identity", False, True, False)):
        down = _weight((r, d), 0.6, dtype, layout, block, seed=11)
        up = _weight((d, r), 0.6, dtype, layout, None if block is None else (block[1], block[0]), seed=12)
        x = _rand(n, d, dtype=dtype, seed=13)
        res = x if residual else None
        db = _rand(r, dtype=dtype, seed=14) if bias else None
        ub = _rand(d, dtype=dtype, seed=15) if bias else None
        go = _rand(n, d, dtype=dtype, seed=16)
        tag = f"{layout}{'' if block is None else f'{block[0]}x{block[1]}'} d={d} r={r} {act} {_name(dtype)}"
        fargs, bargs = _fwd_args(down, up, db, ub), _bwd_args(down, up)

        def fused(dev, x=x, res=res, fargs=fargs, act=act):
            xd = x.to(dev)
            return lib.fused_adapter(xd, xd if res is not None else None, *_to(fargs, dev), act, 0.5)

        def fused_ref(x=x, res=res, fargs=fargs, act=act):
            x64 = x.double()
            return ref.fused_adapter(x64, x64 if res is not None else None, *_f64(fargs), act, 0.5)

        def backward(dev, x=x, go=go, fargs=fargs, bargs=bargs, act=act, add=add_grad_out):
            xd = x.to(dev)
            _, hidden = lib.fused_adapter(xd, None, *_to(fargs, dev), act, 0.5)
            return lib.fused_adapter_backward(go.to(dev), xd, hidden, *_to(bargs, dev), act, 0.5, add)

        def backward_ref(x=x, go=go, fargs=fargs, bargs=bargs, act=act, add=add_grad_out):
            x64 = x.double()
            _, hidden = ref.fused_adapter(x64, None, *_f64(fargs), act, 0.5)
            return ref.fused_adapter_backward(go.double(), x64, hidden, *_f64(bargs), act, 0.5, add)

        out += [(f"fused_adapter {tag}{' residual=x' if residual else ''}", dtype, fused, fused_ref),
                (f"fused_adapter_backward {tag}{' add_grad_out' if add_grad_out else ''}", dtype, backward,
                 backward_ref)]
    return out


def _name(dtype):
    return str(dtype).replace("torch.", "")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.double()
    denom = want.norm().item()
    err = (got - want).norm().item()
    return err / denom if denom > 0 else err


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--json", help="write the per-op results here")
    args = ap.parse_args(argv)
    import sparseadapter_kernels as sak

    key = "cuda" if args.device == "cuda" else "cpu"
    ok, why = sak.backend_status()[key]
    if not ok:
        print(f"gpu_check_ops: the {key} kernels are not usable here: {why}", flush=True)
        return 2
    results, bad = [], 0
    for name, dtype, fn, reference in cases(args.device):
        t0 = time.perf_counter()
        try:
            outs = fn(args.device)
            if args.device == "cuda":
                torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001  (record it and go on: every op gets its one call)
            bad += 1
            results.append({"op": name, "dtype": _name(dtype), "ok": False, "error": f"{type(exc).__name__}: {exc}"})
            print(f"ERR  {name}: {type(exc).__name__}: {exc}", flush=True)
            continue
        secs = time.perf_counter() - t0
        errs = [rel_err(o, w) for o, w in zip(outs, reference())]
        worst = max(errs) if errs else 0.0
        passed = bool(worst <= REL_TOL[dtype])
        bad += not passed
        results.append({"op": name, "dtype": _name(dtype), "rel_err": worst, "tol": REL_TOL[dtype], "ok": passed,
                        "seconds": round(secs, 4)})
        print(f"{'ok ' if passed else 'BAD'}  {name}: rel err {worst:.2e} (bound {REL_TOL[dtype]:.0e}), "
              f"{secs * 1e3:.1f} ms", flush=True)
    print(f"gpu_check_ops: {len(results)} calls on {args.device}, {bad} mismatched", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "calls": results, "mismatched": bad}, f, indent=1)
            f.write("\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
