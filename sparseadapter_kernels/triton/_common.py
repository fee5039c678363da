"""Pieces shared by the Triton kernel files: interpreter detection, dtypes, autotune configs, jit helpers.

Imported only once ``triton`` imports (see :func:`sparseadapter_kernels.triton.status`).
"""
from __future__ import annotations

import os
from typing import List, Sequence, Tuple

import torch
import triton
import triton.language as tl

# Kernels decorated while TRITON_INTERPRET=1 run on the CPU (triton reads the variable when a kernel
# is decorated, i.e. when the kernel files are imported, which happens right after this module).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

BLOCK_SIZES = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Activation codes (constexpr ACT of the kernels), names as in reference.ACTIVATIONS.
ACT_CODES = {"identity": 0, "relu": 1, "gelu": 2, "silu": 3}


def configs(gpu: Sequence[Tuple[int, int, int]], interpret_block_n: int = 16) -> List[triton.Config]:
    """Autotune configs from ``(BLOCK_N, num_warps, num_stages)`` triples; one small config under the
    interpreter (no tuning there: it would only make CI slower)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_N": interpret_block_n}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s) for bn, w, s in gpu]


def n_bucket(n):
    """Autotune key for the token count: its power-of-two bucket (token counts vary per batch; tuning
    once per bucket, not once per distinct N). A symbolic N (torch.compile, dynamic shapes) is passed
    through unchanged rather than specialized."""
    if not isinstance(n, int):
        return n
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def op(name: str):
    """Register a launcher-calling function as the op ``name`` (schema from its annotations).

    GPU: ``torch.library.triton_op`` (torch.compile traces into it; the launches are captured by
    ``wrap_triton``). Under the interpreter ``wrap_triton`` cannot capture launches, so the op is an
    opaque ``torch.library.custom_op`` whose fake implementation is the same function (the launchers skip
    the launch on fake tensors): torch.compile / opcheck still see the same schema, shapes and autograd.
    """
    def deco(fn):
        if INTERPRET:
            custom = torch.library.custom_op(name, fn, mutates_args=())
            custom.register_fake(fn)
            return custom
        return torch.library.triton_op(name, fn, mutates_args=())
    return deco


# fp32 products when torch's TF32 switch is off: "tf32x3" (three TF32 tensor-core products, error at
# fp32 rounding level) or "ieee" (exact fp32 FMAs: its tl.dot code grows with the tile; at 64- and
# 128-wide blocks the sm_90 compile of the tuned tiles takes minutes and spills kilobytes per thread).
FP32_PRECISION = os.environ.get("SAK_TRITON_FP32_PRECISION", "tf32x3")
FP32_MAX_BLOCK_N = 64   # fp32 tiles hold twice the bytes: the larger token tiles spill on sm_90


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of ``tl.dot``. fp32 follows torch's TF32 switch: "tf32" when it is on, else
    FP32_PRECISION (fp32-level accuracy); fp16/bf16 ignore it."""
    if dtype == torch.float32:
        if torch.backends.cuda.matmul.allow_tf32:
            return "tf32"
        if FP32_PRECISION not in ("tf32x3", "ieee"):
            raise ValueError(f"SAK_TRITON_FP32_PRECISION: expected 'tf32x3' or 'ieee', got {FP32_PRECISION!r}")
        return FP32_PRECISION
    return "tf32"


def prune_configs(configs, named_args, **kwargs):
    """``early_config_prune`` of every autotuned kernel: fp32 (PREC "tf32x3"/"ieee") keeps the token
    tiles up to FP32_MAX_BLOCK_N (the larger ones spill and only lengthen tuning)."""
    prec = kwargs.get("PREC", named_args.get("PREC"))
    if prec in ("tf32x3", "ieee"):
        small = [c for c in configs if c.kwargs["BLOCK_N"] <= FP32_MAX_BLOCK_N]
        return small or [min(configs, key=lambda c: c.kwargs["BLOCK_N"])]
    return configs


def upcast_dot(dtype: torch.dtype) -> bool:
    """The interpreter (triton 3.9) multiplies bf16 as raw uint16 in ``tl.dot``: upcast it there."""
    return INTERPRET and dtype == torch.bfloat16


_SM_COUNT: dict = {}


def sm_count(device: torch.device) -> int:
    """Multiprocessors of ``device`` (a small constant on the CPU under the interpreter)."""
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def traced_under_interpreter(t: torch.Tensor) -> bool:
    """True when torch is only tracing the op (fake tensors) and the kernels are interpreted.

    On the GPU, ``wrap_triton`` makes a launch traceable (torch.compile, fake tensors). Under the
    interpreter it hands back the raw kernel, which would run on fake tensors while torch traces the op
    (opcheck, torch.compile(backend="aot_eager")): the launchers skip the launch then (outputs are only
    shapes there).
    """
    if not INTERPRET:
        return False
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


def nonempty(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A valid pointer for a kernel argument that may be empty (all blocks pruned) or absent."""
    return t if t is not None and t.numel() > 0 else like


# ---------------------------------------------------------------------------------------------
# jit helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def mma(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def activation(h, ACT: tl.constexpr):
    """act(h) in fp32 (codes of ACT_CODES)."""
    if ACT == 1:
        return tl.where(h <= 0.0, 0.0, h)  # NaN stays NaN (torch.relu keeps it; maximum may not)
    elif ACT == 2:
        return 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    elif ACT == 3:
        return h * tl.sigmoid(h)
    else:
        return h


@triton.jit
def activation_grad(h, ACT: tl.constexpr):
    """d act(h) / dh in fp32."""
    if ACT == 1:
        return tl.where(h > 0.0, 1.0, 0.0)
    elif ACT == 2:
        cdf = 0.5 * (1.0 + tl.erf(h * 0.7071067811865476))
        pdf = tl.exp(-0.5 * h * h) * 0.3989422804014327
        return cdf + h * pdf
    elif ACT == 3:
        s = tl.sigmoid(h)
        return s * (1.0 + h * (1.0 - s))
    else:
        return h * 0.0 + 1.0
