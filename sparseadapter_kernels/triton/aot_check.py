"""Compile the Triton kernels for a GPU target without a GPU, and report their resources.

    python -m sparseadapter_kernels.triton.aot_check              # every kernel x block shape x config, sm_90
    python -m sparseadapter_kernels.triton.aot_check --dtype bfloat16 --kernel fwd,bwd --arch 90

The real launch path cannot run here (no GPU), and the interpreter never compiles anything, so this is the
one check of the GPU code path that CI can run: it lowers every kernel through Triton's full pipeline to
a cubin for the target (with the argument specialisations a real launch gets: 16-byte aligned pointers,
strides and feature sizes divisible by 16), and reads registers, spill stack and shared memory off the
cubin. ``python_tests/test_triton_compile.py`` runs a representative subset; this CLI runs all of it
(bf16 about 2 minutes, fp32 about 5 minutes on 2 cores).

Must run in a process without ``TRITON_INTERPRET=1`` (the kernels must be real JIT functions).
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import torch
import triton

from . import bsr_linear, fused_adapter
from ._common import ACT_CODES, INTERPRET, dot_precision, prune_configs

H100_SMEM = 232448          # bytes of shared memory one block may use on sm_90
_TL = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_DIV16_INTS = ("D", "R", "DOUT", "K", "M")


@dataclass
class Compiled:
    kernel: str
    case: str
    config: str
    seconds: float
    registers: Optional[int]
    spill_stack: Optional[int]
    shared: int

    def fits(self) -> bool:
        return self.shared <= H100_SMEM

    def __str__(self) -> str:
        return (f"{self.kernel:6s} {self.case:38s} {self.config:9s} {self.seconds:5.1f}s regs={self.registers} "
                f"stack={self.spill_stack} smem={self.shared}{'' if self.fits() else ' (over the sm_90 limit)'}")


def _resources(compiled) -> Dict[str, Optional[int]]:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {"registers": None, "spill_stack": None}
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, timeout=60)
    finally:
        os.unlink(f.name)
    regs = re.search(r"REG:(\d+)", out.stdout)
    stack = re.search(r"STACK:(\d+)", out.stdout)
    return {"registers": int(regs.group(1)) if regs else None, "spill_stack": int(stack.group(1)) if stack else None}


def compile_one(autotuned, pointers: Dict[str, str], constexprs: dict, config: triton.Config, arch: int = 90):
    """Compile ``autotuned`` (an ``@triton.autotune`` kernel) for ``cuda:arch`` with ``config``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = autotuned.fn
    consts = dict(constexprs, **config.kwargs)
    sig = {n: "constexpr" if n in consts else pointers.get(n, "fp32" if n == "scale" else "i32") for n in fn.arg_names}
    div16 = [n for n, t in sig.items() if t.startswith("*") or n.startswith("stride") or n in _DIV16_INTS]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div16}
    return triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def _kernels(dtype: torch.dtype, which: List[str], full: bool) -> Iterator[tuple]:
    """(name, case, autotuned kernel, pointer types, constexprs) of the cases to compile."""
    p = "*" + _TL[dtype]
    prec = dot_precision(dtype)
    base = dict(PREC=prec, UPCAST=False)
    blocks = [(16, 16), (32, 32), (64, 64), (128, 128), (32, 128)] if full else [(16, 16), (64, 64), (32, 128)]
    if "mm" in which:
        ptrs = {"X": p, "V": p, "CROW": "*i32", "COL": "*i32", "PERM": "*i32", "Y": p}
        for (bh, bw), trans in itertools.product(blocks, (False, True)):
            c = dict(base, BH=bh, BW=bw, TRANS=trans, OUT_B=bw if trans else bh, RED_B=bh if trans else bw)
            yield "mm", f"{bh}x{bw} {'dx' if trans else 'fwd'}", bsr_linear._bsr_mm_kernel, ptrs, c
    if "sddmm" in which:
        ptrs = {"DY": p, "X": p, "ROW": "*i32", "COL": "*i32", "P": "*fp32"}
        for bh, bw in blocks:
            yield "sddmm", f"{bh}x{bw}", bsr_linear._bsr_sddmm_kernel, ptrs, dict(base, BH=bh, BW=bw)
    adapters = [("bsr 16/16", False, 16, 16, 16, 16), ("bsr 32/32", False, 32, 32, 32, 32),
                ("bsr 64/64", False, 64, 64, 64, 64), ("bsr 32x64 down, 64x32 up", False, 32, 64, 64, 32)]
    if full:
        adapters += [("bsr 128/128", False, 128, 128, 128, 128)]
    dense_fwd = [("dense r=64", True, 64, 64, 64, 64), ("dense r=128", True, 128, 64, 64, 128)]
    if "fwd" in which:
        ptrs = {n: p for n in ("X", "RES", "H", "OUT", "DV", "DB", "UV", "UB")}
        ptrs.update({n: "*i32" for n in ("DCROW", "DCOL", "UCROW", "UCOL")})
        for name, dense, bhd, bwd, bhu, bwu in adapters + dense_fwd:
            c = dict(base, ACT=ACT_CODES["gelu"], HAS_RES=True, HAS_DB=True, HAS_UB=True, DENSE=dense, BHD=bhd,
                     BWD=bwd, BHU=bhu, BWU=bwu)
            yield "fwd", name, fused_adapter._fused_adapter_fwd_kernel, ptrs, c
    if "bwd" in which:
        ptrs = {n: p for n in ("G", "X", "H", "DH", "GX", "DV", "UV")}
        ptrs.update({n: "*i32" for n in ("DTCROW", "DTROW", "DTPERM", "UTCROW", "UTROW", "UTPERM")})
        ptrs.update({n: "*fp32" for n in ("DVACC", "DBACC", "UVACC", "UBACC")})
        for (name, dense, bhd, bwd, bhu, bwu), atomic in itertools.product(adapters + dense_fwd[:1], (True, False)):
            c = dict(base, ACT=ACT_CODES["gelu"], HAS_DB=True, HAS_UB=True, UB_IN_LOOP=dense, WGRAD_ATOMIC=atomic,
                     DENSE=dense, BHD=bhd, BWD=bwd, BHU=bhu, BWU=bwu)
            yield "bwd", f"{name} {'atomic' if atomic else 'sddmm'}", fused_adapter._fused_adapter_bwd_kernel, ptrs, c


def run(dtypes=(torch.bfloat16,), which=("mm", "sddmm", "fwd", "bwd"), full=True, arch=90,
        first_config_only=False, echo=False) -> List[Compiled]:
    """Compile the selected kernels for every autotune config the tuner would try (after pruning)."""
    if INTERPRET:
        raise RuntimeError("aot_check needs real JIT kernels: run it without TRITON_INTERPRET=1")
    out = []
    for dtype in dtypes:
        for kname, case, kernel, ptrs, consts in _kernels(dtype, list(which), full):
            cfgs = prune_configs(kernel.configs, {}, **consts)
            for cfg in cfgs[:1] if first_config_only else cfgs:
                t0 = time.time()
                compiled = compile_one(kernel, ptrs, consts, cfg, arch)
                res = _resources(compiled)
                rec = Compiled(kname, f"{_TL[dtype]} {case}",
                               f"{cfg.kwargs['BLOCK_N']}/{cfg.num_warps}/{cfg.num_stages}", time.time() - t0,
                               res["registers"], res["spill_stack"], compiled.metadata.shared)
                if echo:
                    print(rec, flush=True)
                out.append(rec)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bfloat16,float32", help="comma-separated torch dtype names")
    ap.add_argument("--kernel", default="mm,sddmm,fwd,bwd")
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args(argv)
    dtypes = [getattr(torch, d) for d in args.dtype.split(",")]
    recs = run(dtypes, args.kernel.split(","), full=True, arch=args.arch, echo=True)
    spilled = [r for r in recs if r.spill_stack]
    over = [r for r in recs if not r.fits()]
    print(f"{len(recs)} compiled; {len(spilled)} with a spill stack; {len(over)} over the shared-memory limit "
          "(the autotuner skips those configs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
