"""Command line of ``sparseadapter-bench``: options, validation (clear message + exit 2, no traceback)."""
from __future__ import annotations

import argparse
import os
from typing import List, Optional, Sequence, Tuple

import torch

from . import shapes as S
from .impls import KERNEL_BACKENDS, backend_skip_reason
from .suites import choices as suite_choices

DESCRIPTION = """\
Dense vs sparse adapter throughput, side by side, on this machine.

Every row runs the same problem through torch dense on the masked weight (same dtype, and the
fastest dense dtype, measured once per run), the dense-mask reference (what the official
SparseAdapter code does), torch.sparse where it has a kernel, and each of our available backends;
each output is verified against a float64 oracle (the test suite's tolerance rule) before it is
timed; all of a row are timed interleaved, and every ratio is the median of the paired per-round
ratios with its spread. Results (JSON + CSV with provenance) and PNG plots go to --out; every
named suite (--suite) writes the same format, which --compare reads."""

EPILOG = """\
examples:
  sparseadapter-bench                               # the default sweep (docs/method.md shapes)
  sparseadapter-bench --quick                       # a reduced sweep, about a minute
  sparseadapter-bench --suite readme                # the README speed table (readme_table.md)
  sparseadapter-bench --suite crossover             # re-derive dispatch.CROSSOVER on this machine
  sparseadapter-bench --suite gpu --quick           # GPU acceptance figures (pass/fail in results.json)
  TRITON_INTERPRET=1 sparseadapter-bench --suite gpu --smoke   # the GPU suites' plumbing, on the CPU
  sparseadapter-bench --shapes large --suites main --ops adapter --modes fwd
  sparseadapter-bench --tokens 512 --d 1024 --r 128 --sparsities 0.9,0.95 --layouts bsr --block-size 16x16
  sparseadapter-bench --compare old/results.json bench_out/results.json
"""

BACKEND_CHOICES = ("reference", "auto") + KERNEL_BACKENDS


def _list(text: str) -> List[str]:
    items = [t.strip() for t in text.replace(";", ",").replace(" ", ",").split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list, got nothing")
    return items


def _choices(choices: Sequence[str], what: str):
    def parse(text: str) -> List[str]:
        out = []
        for item in _list(text):
            if item not in choices:
                raise argparse.ArgumentTypeError(f"unknown {what} {item!r} (choose from {', '.join(choices)})")
            if item not in out:
                out.append(item)
        return out
    return parse


def _each(text: str, convert, what: str, check) -> list:
    """Parse a comma list: ``convert`` each item (ValueError -> "is not a ..."), then ``check`` it
    (returns an error message or '')."""
    out = []
    for item in _list(text):
        try:
            v = convert(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what}{item!r} is not {'an integer' if convert is int else 'a number'}") from None
        why = check(v)
        if why:
            raise argparse.ArgumentTypeError(why)
        out.append(v)
    return out


def _sparsities(text: str) -> List[float]:
    return sorted(set(_each(text, float, "", lambda s: "" if 0.0 <= s < 1.0 else
                            f"sparsity {s:g} is outside [0, 1) (it is the fraction of weights removed: 0.9 keeps 10%)")))


def _positive_ints(text: str, what: str = "value", minimum: int = 1) -> List[int]:
    return _each(text, int, what + " ", lambda v: f"{what} {v} must be >= {minimum}" if v < minimum else "")


def _one_int(text: str, minimum: int) -> int:
    vals = _positive_ints(text, minimum=minimum)
    if len(vals) != 1:
        raise argparse.ArgumentTypeError(f"expected one integer, got {text!r}")
    return vals[0]


def _positive_int(text: str) -> int:
    return _one_int(text, 1)


def _nonneg_int(text: str) -> int:
    return _one_int(text, 0)


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0")
    return v


def _shapes(text: str) -> List[Tuple[int, int, int]]:
    out = []
    for item in _list(text):
        if item in S.SHAPE_PRESETS:
            out.append(S.SHAPE_PRESETS[item])
            continue
        parts = item.lower().split("x")
        try:
            n, d, r = (int(p) for p in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{item!r}: expected a preset ({', '.join(S.SHAPE_PRESETS)}) or NxDxR, e.g. 4096x768x64") from None
        if min(n, d, r) < 1:
            raise argparse.ArgumentTypeError(f"{item!r}: N, d and r must be positive")
        out.append((n, d, r))
    return out


def _dtypes(text: str) -> List[str]:
    out = []
    for item in _list(text):
        name = S.DTYPE_ALIASES.get(item.lower())
        if name is None:
            raise argparse.ArgumentTypeError(f"unknown dtype {item!r} (choose from float32, bfloat16, float16, float64)")
        if name not in out:
            out.append(name)
    return out


def _block_size(text: str) -> Tuple[int, int]:
    parts = text.lower().replace(",", "x").split("x")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected BHxBW (e.g. 32x32) or one size (e.g. 16)") from None
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected two positive sizes BHxBW (e.g. 32x32)")
    return vals[0], vals[1]


def build_parser() -> argparse.ArgumentParser:
    from .suites import describe

    p = argparse.ArgumentParser(prog="sparseadapter-bench", description=DESCRIPTION,
                                epilog=EPILOG + "\nsuites (--suite):\n" + "\n".join(describe()),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to run")
    g.add_argument("--suite", type=_choices(suite_choices(), "suite"), default=["sweep"], metavar="LIST",
                   help="named suites, comma-separated (default: sweep); see the list below")
    g.add_argument("--tune", action="store_true",
                   help="measure where the CPU kernels beat dense math on this machine and store backend=auto's "
                        "decision tables in the tuning cache (the suite 'tune'; a few minutes)")
    g.add_argument("--smoke", action="store_true",
                   help="tiny shapes and 3 repetitions on any device (the GPU suites on the CPU, Triton under "
                        "TRITON_INTERPRET=1): proves a suite starts and writes its files; its numbers mean nothing")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="device to benchmark (default: auto = cuda if a GPU is visible, else cpu)")
    g.add_argument("--shapes", type=_shapes, default=None, metavar="LIST",
                   help=f"shapes N x d x r: presets ({', '.join(f'{k}={v[0]}x{v[1]}x{v[2]}' for k, v in S.SHAPE_PRESETS.items())}) "
                        "or NxDxR, comma-separated (default: default)")
    g.add_argument("--tokens", type=_positive_int, default=None, metavar="N", help="override N (tokens) of every shape")
    g.add_argument("--d", type=_positive_int, default=None, metavar="D", help="override d (model width) of every shape")
    g.add_argument("--r", type=_positive_int, default=None, metavar="R", help="override r (bottleneck) of every shape")
    g.add_argument("--dtypes", type=_dtypes, default=None, metavar="LIST",
                   help="dtypes (float32, bfloat16, float16, float64; default: float32 on cpu, bfloat16 on cuda)")
    g.add_argument("--sparsities", type=_sparsities, default=None, metavar="LIST",
                   help="fractions of weights removed, each in [0, 1) (default: 0,0.5,0.8,0.9,0.95)")
    g.add_argument("--backends", type=_choices(BACKEND_CHOICES, "backend"), default=None, metavar="LIST",
                   help=f"our backends to time ({', '.join(BACKEND_CHOICES)}; default: every available one on the "
                        "device). The baselines (torch dense, reference, torch.sparse) always run")
    g.add_argument("--layouts", type=_choices(("csr", "bsr"), "layout"), default=None, metavar="LIST",
                   help="csr (unstructured masks), bsr (block masks) (default: csr,bsr)")
    g.add_argument("--block-size", type=_block_size, default=S.DEFAULT_BLOCK_SIZE, metavar="BHxBW",
                   help="BSR block size (default: %(default)s -> 32x32); must divide d and r")
    g.add_argument("--modes", type=_choices(S.MODES, "mode"), default=None, metavar="LIST",
                   help="fwd (forward), fwdbwd (forward + backward) (default: fwd,fwdbwd)")
    g.add_argument("--ops", type=_choices(S.OPS, "op"), default=None, metavar="LIST",
                   help="down ([r,d] projection), up ([d,r] projection), adapter (whole layer) (default: all)")
    g.add_argument("--suites", type=_choices(S.SUITES, "suite"), default=None, metavar="LIST",
                   help="parts of the sweep: main, large-sparse (dense r vs k*r at 1-1/k), tokens (time vs N), "
                        "memory (default: all)")
    g.add_argument("--large-sparse-k", type=lambda t: _positive_ints(t, "k", 2), default=None, metavar="LIST",
                   help="Large-Sparse factors k (default: 2,4,8)")
    g.add_argument("--token-sweep", type=lambda t: _positive_ints(t, "N"), default=None, metavar="LIST",
                   help="token counts N for the time-vs-N suite (default: 256,1024,4096,16384)")
    g.add_argument("--activation", choices=("relu", "gelu", "silu", "identity"), default=S.DEFAULT_ACTIVATION,
                   help="adapter activation (default: %(default)s; relu's kink can fail gradient checks by chance)")
    g.add_argument("--no-torch-sparse", dest="torch_sparse", action="store_false",
                   help="skip the torch.sparse baseline")
    g.add_argument("--quick", action="store_true",
                   help="a reduced sweep (sparsities 0.5,0.9; ops down,adapter; k=4; fewer repeats): about a minute")
    t = p.add_argument_group("timing")
    t.add_argument("--repeats", type=_positive_int, default=None,
                   help=f"most timed calls per measurement (default: {S.DEFAULT_REPEATS})")
    t.add_argument("--min-repeats", type=_positive_int, default=None,
                   help=f"fewest timed calls per measurement (default: {S.DEFAULT_MIN_REPEATS})")
    t.add_argument("--max-time", type=_positive_float, default=None, metavar="SECONDS",
                   help=f"time budget per measurement between those bounds (default: {S.DEFAULT_MAX_TIME})")
    t.add_argument("--warmup", type=_nonneg_int, default=None,
                   help=f"untimed calls before timing (default: {S.DEFAULT_WARMUP}; at least 1 runs)")
    t.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help=f"seconds for the whole run: when the sweep projects past it, measurements get less time, "
                        f"down to 3 calls (default: {S.DEFAULT_TIME_BUDGET:g}; 0 = no limit)")
    t.add_argument("--buffers", type=_nonneg_int, default=0,
                   help="rotating input buffers (default: 0 = enough to exceed the caches)")
    t.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's)")
    t.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's allocator as it is (default: keep freed memory in the process, so no "
                        "implementation is timed paying page faults for memory another one just returned)")
    t.add_argument("--seed", type=int, default=0, help="random seed of weights, masks and inputs (default: 0)")
    t.add_argument("--noise-threshold", type=_positive_float, default=S.DEFAULT_NOISE_THRESHOLD, metavar="FRACTION",
                   help="flag a ratio whose spread (IQR / median of its paired per-round ratios) is wider "
                        "(marked ~, drawn hollow; default: %(default)g)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="bench_out", metavar="DIR",
                   help="where results.json, results.csv and the plots go (default: %(default)s)")
    o.add_argument("--no-plots", dest="plots", action="store_false", help="do not write PNG plots")
    o.add_argument("--tables", action="store_true",
                   help="also print the full table of every case at the end (they are always in results.csv)")
    o.add_argument("--strict", action="store_true",
                   help="exit with status 4 when a required acceptance figure (--suite gpu) fails")
    o.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar (it is shown on a terminal)")
    o.add_argument("--compare", nargs=2, metavar=("A", "B"), default=None,
                   help="print the speedup of results B over results A (files or directories) and exit")
    return p


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> S.SweepConfig:
    """Validate what argparse could not check alone; ``parser.error`` (exit 2) on a bad combination."""
    if args.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = args.device
        if device == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    quick = S.SMOKE if args.smoke else S.QUICK if args.quick else {}

    def pick(value, key, default):
        return value if value is not None else quick.get(key, default)

    shapes = args.shapes or list(quick.get("shapes", [S.SHAPE_PRESETS["default"]]))
    shapes = [(args.tokens or n, args.d or d, args.r or r) for (n, d, r) in shapes]
    shapes = list(dict.fromkeys(shapes))
    dtypes = args.dtypes or (["bfloat16"] if device == "cuda" else ["float32"])
    layouts = args.layouts or list(S.DEFAULT_LAYOUTS)
    suites = args.suites or list(S.SUITES)
    cfg = S.SweepConfig(
        device=device, shapes=shapes, dtypes=dtypes,
        sparsities=list(pick(args.sparsities, "sparsities", S.DEFAULT_SPARSITIES)),
        layouts=layouts, block_size=tuple(args.block_size), modes=args.modes or list(S.MODES),
        ops=list(pick(args.ops, "ops", S.OPS)), suites=suites,
        large_sparse_k=list(pick(args.large_sparse_k, "large_sparse_k", S.DEFAULT_LARGE_SPARSE_K)),
        token_sweep=list(pick(args.token_sweep, "token_sweep", S.DEFAULT_TOKEN_SWEEP)),
        activation=args.activation,
        warmup=pick(args.warmup, "warmup", S.DEFAULT_WARMUP), repeats=pick(args.repeats, "repeats", S.DEFAULT_REPEATS),
        min_repeats=pick(args.min_repeats, "min_repeats", S.DEFAULT_MIN_REPEATS),
        max_time=pick(args.max_time, "max_time", S.DEFAULT_MAX_TIME), buffers=args.buffers, seed=args.seed,
        torch_sparse=args.torch_sparse,
        time_budget=0.0, noise_threshold=args.noise_threshold)
    total = (0.0 if args.smoke else S.DEFAULT_TIME_BUDGET) if args.time_budget is None else args.time_budget
    if total < 0:
        parser.error(f"--time-budget {total:g}: must be >= 0 (0 = no limit)")
    if total > 0:
        reserve = (S.BUDGET_RESERVE_S["memory"] if "memory" in suites else 0.0) + \
            (S.BUDGET_RESERVE_S["plots"] if args.plots else 0.0)
        cfg.time_budget = max(0.5 * total, total - reserve)
    if args.min_repeats is None:   # --repeats alone lowers the default floor with it
        cfg.min_repeats = min(cfg.min_repeats, cfg.repeats)
    if cfg.min_repeats > cfg.repeats:
        parser.error(f"--min-repeats {cfg.min_repeats} is larger than --repeats {cfg.repeats}")
    if "bsr" in layouts:
        rs = {(n, d, r) for (n, d, r) in shapes}
        if "large-sparse" in suites:
            rs |= {(n, d, k * r) for (n, d, r) in shapes for k in cfg.large_sparse_k}
        for (n, d, r) in sorted(rs):
            why = S.blocking_problem(n, d, r, cfg.block_size)
            if why:
                parser.error(f"--block-size / --layouts bsr: {why} (pick another --block-size or --layouts csr)")
    # Backends: every available one by default; an explicit request must be runnable here.
    if args.backends is None:
        from .impls import discover_backends

        cfg.backends = discover_backends(device)[0]
    else:
        chosen = []
        for name in args.backends:
            if name in ("reference", "auto"):
                if name == "auto":
                    chosen.append(name)
                continue
            why = backend_skip_reason(name, device)
            if why:
                parser.error(f"--backends {name}: cannot be timed on {device}: {why}")
            chosen.append(name)
        cfg.backends = chosen
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.compare:
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as exc:
            parser.error(f"--out {args.out}: cannot create the directory ({exc.strerror})")
    return cfg


def parse(argv: Optional[Sequence[str]] = None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tune:
        args.suite = ["tune"] if args.suite == ["sweep"] else list(dict.fromkeys(args.suite + ["tune"]))
    if args.compare:
        return parser, args, None
    return parser, args, config_from_args(parser, args)
