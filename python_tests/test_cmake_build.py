"""The CMake build (CMakeLists.txt, same csrc/SOURCES) loads through torch.ops.load_library and runs the
CPU kernels. `make test` builds it first (`make cmake-build`); run that by hand otherwise."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = os.environ.get("SAK_CMAKE_LIBRARY", os.path.join(ROOT, "build", "cmake", "libsparseadapter_kernels.so"))

pytestmark = pytest.mark.skipif(not os.path.exists(LIBRARY),
                                reason=f"no CMake build at {LIBRARY} (run `make cmake-build`)")

SCRIPT = r"""
import torch, sparseadapter_kernels as sak
from sparseadapter_kernels import reference as ref
from sparseadapter_kernels._extension import EXTENSION
assert EXTENSION.loaded and EXTENSION.source == LIB, (EXTENSION.source, EXTENSION.error)
assert EXTENSION.has_cpu and sak.backend_status()["cpu"][0]
lib = torch.ops.sparseadapter_kernels
g = torch.Generator().manual_seed(0)
for layout, block, shape in (("csr", None, (40, 72)), ("bsr", (8, 24), (48, 96))):
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    if layout == "csr":
        mask = torch.rand(shape, generator=g) > 0.6
    else:
        mask = (torch.rand(shape[0] // 8, shape[1] // 24, generator=g) > 0.5).repeat_interleave(8, 0).repeat_interleave(24, 1)
    for dtype in (torch.float32, torch.float64):
        sw = sak.SparseWeight.from_dense(w.to(dtype), mask, layout=layout, block_size=block)
        x = torch.randn(37, shape[1], generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
        y = sak.ops.sparse_linear(x, sw, backend="cpu")
        expected = x.detach().double() @ (w * mask).T
        torch.testing.assert_close(y.double(), expected, atol=1e-4, rtol=1e-4)
        y.sum().backward()
        torch.testing.assert_close(x.grad.double(), (w * mask).sum(0).expand(37, -1), atol=1e-4, rtol=1e-4)
print("cmake build OK from", EXTENSION.source)
"""


def test_cmake_library_runs_the_cpu_kernels():
    env = dict(os.environ, SPARSEADAPTER_KERNELS_LIBRARY=LIBRARY, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", f"LIB = {LIBRARY!r}\n" + SCRIPT], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cmake build OK" in proc.stdout
