"""Benchmark problems: the default sweep (docs/method.md), shared by the CLI, the suites and ``benchmarks/``.

A :class:`Problem` is one row group of the results: an op (``down`` / ``up`` projection or the whole
``adapter`` layer), a mode (``fwd`` or ``fwdbwd``), a shape, a sparsity, a layout and a dtype. Every
implementation (dense baselines, the dense-mask reference, ``torch.sparse`` and our backends) is
timed on the same :class:`Problem` in the same run.

Conventions (as in ``formats.py``): ``down`` is ``[r, d]`` (x ``[N, d]`` -> ``[N, r]``), ``up`` is
``[d, r]`` (x ``[N, r]`` -> ``[N, d]``), the adapter is ``out = x + scale * up(act(down(x)))``.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Sequence, Tuple

# Default shapes (docs/method.md) (BERT-base adapter, the paper's setting): N = 32 x 128 tokens.
DEFAULT_TOKENS = 4096
DEFAULT_D = 768
DEFAULT_R = 64
# Named shape presets for --shapes: (N, d, r).
SHAPE_PRESETS: Dict[str, Tuple[int, int, int]] = {
    "default": (DEFAULT_TOKENS, DEFAULT_D, DEFAULT_R),   # BERT-base adapter
    "large": (16384, 4096, 64),                          # LLM-sized adapter
    "tiny": (64, 64, 32),                                # smoke tests
}
DEFAULT_SPARSITIES: Tuple[float, ...] = (0.0, 0.5, 0.8, 0.9, 0.95)
DEFAULT_LAYOUTS: Tuple[str, ...] = ("csr", "bsr")
DEFAULT_BLOCK_SIZE: Tuple[int, int] = (32, 32)
MODES: Tuple[str, ...] = ("fwd", "fwdbwd")
OPS: Tuple[str, ...] = ("down", "up", "adapter")
SUITES: Tuple[str, ...] = ("main", "large-sparse", "tokens", "memory")
# Large-Sparse (paper Sec. 3.3): bottleneck k*r at sparsity 1 - 1/k keeps the nonzeros of dense r.
DEFAULT_LARGE_SPARSE_K: Tuple[int, ...] = (2, 4, 8)
# Time vs tokens N (whole adapter layer, forward, at this sparsity).
DEFAULT_TOKEN_SWEEP: Tuple[int, ...] = (256, 1024, 4096, 16384)
TOKEN_SWEEP_SPARSITY = 0.9
DEFAULT_ACTIVATION = "silu"   # AdapterHub's Houlsby default ("swish"); smooth, so gradients verify cleanly
DEFAULT_SCALE = 1.0

# Timing defaults: each measurement runs `warmup` calls, then as many calls as fit in `max_time`
# seconds, at least `min_repeats` and at most `repeats`; the median is reported.
DEFAULT_WARMUP = 1   # the verification call already ran the code path once
DEFAULT_REPEATS = 50
DEFAULT_MIN_REPEATS = 5
DEFAULT_MAX_TIME = 0.25
# A ratio whose spread (interquartile range / median of its paired per-round ratios) is wider than this is
# flagged as noisy (marked ~ in the tables, drawn hollow in the plots).
DEFAULT_NOISE_THRESHOLD = 0.15
# The CLI's time budget for a whole run (the timed sweep gets it minus a reserve for the memory suite
# and the plots): `make bench`, build included, must finish within 10 minutes on the 2-core
# development machine, even a busy one. A quiet machine needs about 3.5 minutes without cuts.
DEFAULT_TIME_BUDGET = 360.0
BUDGET_RESERVE_S = {"memory": 45.0, "plots": 10.0}

# --quick: a reduced sweep (about a minute on the 2-core development machine).
QUICK = dict(sparsities=(0.5, 0.9), ops=("down", "adapter"), large_sparse_k=(4,), token_sweep=(1024, 4096),
             warmup=1, repeats=20, min_repeats=3, max_time=0.1)
# --smoke: tiny shapes, 3 rounds: proves the sweep starts and writes its files (its numbers mean nothing).
SMOKE = dict(QUICK, shapes=[SHAPE_PRESETS["tiny"]], token_sweep=(32, 64), large_sparse_k=(2,), warmup=0, repeats=3,
             min_repeats=3, max_time=1e-4)

DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "f32": "float32", "float": "float32",
                 "bfloat16": "bfloat16", "bf16": "bfloat16",
                 "float16": "float16", "fp16": "float16", "half": "float16",
                 "float64": "float64", "fp64": "float64", "double": "float64"}


@dataclass(frozen=True)
class Problem:
    """One benchmark problem; every implementation of a row group runs exactly this."""

    suite: str                     # "main" | "large-sparse" | "tokens" | "memory" | a named suite
    op: str                        # "down" | "up" | "adapter"
    mode: str                      # "fwd" | "fwdbwd"
    n: int                         # tokens
    d: int                         # model width
    r: int                         # bottleneck
    sparsity: float                # target fraction removed
    layout: str                    # "csr" | "bsr"
    block_size: Tuple[int, int]    # (1, 1) for csr
    dtype: str                     # "float32", "bfloat16", ...
    device: str = "cpu"
    k: int = 1                     # Large-Sparse multiplier: r = k * r0 (1 elsewhere)
    r0: int = 0                    # Large-Sparse: the dense bottleneck with the same nonzeros
    activation: str = DEFAULT_ACTIVATION
    scale: float = DEFAULT_SCALE
    bias: bool = True              # the adapter's biases (the projections never have one)
    residual: bool = True          # the adapter adds its input x

    @property
    def weight_shapes(self) -> List[Tuple[int, int]]:
        """``[out, in]`` of each weight of the op (down then up for the adapter)."""
        return {"down": [(self.r, self.d)], "up": [(self.d, self.r)],
                "adapter": [(self.r, self.d), (self.d, self.r)]}[self.op]

    @property
    def in_features(self) -> int:
        return self.weight_shapes[0][1]

    @property
    def out_features(self) -> int:
        return self.weight_shapes[-1][0]

    @property
    def has_bias(self) -> bool:
        """Adapters carry biases (unless ``bias=False``); the single projections are the bare product."""
        return self.op == "adapter" and self.bias

    def key(self) -> Tuple:
        return (self.suite, self.op, self.mode, self.layout, self.dtype, self.n, self.d, self.r, self.k,
                self.sparsity)

    def label(self) -> str:
        bs = f" {self.block_size[0]}x{self.block_size[1]}" if self.layout == "bsr" else ""
        extra = f" (Large-Sparse k={self.k}: dense r={self.r0} -> r={self.r} at s={self.sparsity:g})" if self.k > 1 else ""
        return (f"{self.op} {self.mode} {self.layout}{bs} {self.dtype} N={self.n} d={self.d} r={self.r}"
                f" s={self.sparsity:g}{extra}")

    def as_dict(self) -> dict:
        out = asdict(self)
        out["block_size"] = list(self.block_size)
        return out


@dataclass
class SweepConfig:
    """What to run; built by the CLI (or by tests and ``benchmarks/`` directly)."""

    device: str = "cpu"
    shapes: List[Tuple[int, int, int]] = field(default_factory=lambda: [SHAPE_PRESETS["default"]])
    dtypes: List[str] = field(default_factory=lambda: ["float32"])
    sparsities: List[float] = field(default_factory=lambda: list(DEFAULT_SPARSITIES))
    layouts: List[str] = field(default_factory=lambda: list(DEFAULT_LAYOUTS))
    block_size: Tuple[int, int] = DEFAULT_BLOCK_SIZE
    modes: List[str] = field(default_factory=lambda: list(MODES))
    ops: List[str] = field(default_factory=lambda: list(OPS))
    suites: List[str] = field(default_factory=lambda: list(SUITES))
    backends: List[str] = field(default_factory=list)        # our backends to time (besides the baselines)
    large_sparse_k: List[int] = field(default_factory=lambda: list(DEFAULT_LARGE_SPARSE_K))
    token_sweep: List[int] = field(default_factory=lambda: list(DEFAULT_TOKEN_SWEEP))
    activation: str = DEFAULT_ACTIVATION
    warmup: int = DEFAULT_WARMUP
    repeats: int = DEFAULT_REPEATS
    min_repeats: int = DEFAULT_MIN_REPEATS
    max_time: float = DEFAULT_MAX_TIME
    buffers: int = 0                 # rotating input buffers (0 = automatic)
    seed: int = 0
    torch_sparse: bool = True        # time the torch.sparse baseline
    time_budget: float = 0.0         # seconds for the timed sweep; 0 = no limit (the CLI derives it)
    noise_threshold: float = DEFAULT_NOISE_THRESHOLD

    def as_dict(self) -> dict:
        out = asdict(self)
        out["shapes"] = [list(s) for s in self.shapes]
        out["block_size"] = list(self.block_size)
        return out


def block_for(layout: str, block_size: Sequence[int]) -> Tuple[int, int]:
    return (1, 1) if layout == "csr" else (int(block_size[0]), int(block_size[1]))


def blocking_problem(n: int, d: int, r: int, block_size: Sequence[int]) -> str:
    """Why ``block_size`` cannot tile the adapter weights ``down [r, d]`` and ``up [d, r]`` ('' if it can)."""
    bh, bw = block_size
    bad = [f"{name} [{o}, {i}]" for name, (o, i) in (("down", (r, d)), ("up", (d, r))) if o % bh or i % bw]
    if bad:
        return (f"block size {bh}x{bw} does not tile {' and '.join(bad)} (N={n}, d={d}, r={r}): "
                f"d and r must be multiples of both {bh} and {bw}")
    return ""


def main_problems(cfg: SweepConfig) -> List[Problem]:
    """Main suite: every op x mode x layout x sparsity x dtype x shape."""
    return [Problem("main", op, mode, n, d, r, float(s), layout, block_for(layout, cfg.block_size), dtype,
                    cfg.device, activation=cfg.activation)
            for (n, d, r), dtype, op, mode, layout, s
            in itertools.product(cfg.shapes, cfg.dtypes, cfg.ops, cfg.modes, cfg.layouts, cfg.sparsities)]


def large_sparse_problems(cfg: SweepConfig) -> List[Problem]:
    """Large-Sparse: the adapter layer at r = k * r0 and sparsity 1 - 1/k (same nonzeros as dense r0)."""
    return [Problem("large-sparse", "adapter", mode, n, d, k * r0, 1.0 - 1.0 / k, layout,
                    block_for(layout, cfg.block_size), dtype, cfg.device, k=k, r0=r0, activation=cfg.activation)
            for (n, d, r0), dtype, mode, layout, k
            in itertools.product(cfg.shapes, cfg.dtypes, cfg.modes, cfg.layouts, cfg.large_sparse_k)]


def token_problems(cfg: SweepConfig) -> List[Problem]:
    """Time vs tokens N: the adapter layer, forward, at TOKEN_SWEEP_SPARSITY, first shape's d and r."""
    if not cfg.shapes:
        return []
    _, d, r = cfg.shapes[0]
    return [Problem("tokens", "adapter", "fwd", n, d, r, TOKEN_SWEEP_SPARSITY, layout,
                    block_for(layout, cfg.block_size), dtype, cfg.device, activation=cfg.activation)
            for dtype, layout, n in itertools.product(cfg.dtypes[:1], cfg.layouts, cfg.token_sweep)]


def all_problems(cfg: SweepConfig) -> List[Problem]:
    out: List[Problem] = []
    if "main" in cfg.suites:
        out += main_problems(cfg)
    if "large-sparse" in cfg.suites:
        out += large_sparse_problems(cfg)
    if "tokens" in cfg.suites:
        out += token_problems(cfg)
    return out
