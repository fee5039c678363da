"""Build sparseadapter_kernels and its compiled kernels (sparseadapter_kernels._C).

CUDA sources are built when a CUDA toolkit *and* a CUDA-enabled torch are present (a visible GPU is
not needed); ``USE_CUDA=0`` skips them, ``USE_CUDA=1`` insists. The source list is ``csrc/SOURCES``
(shared with CMakeLists.txt).
"""
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def read_sources(kind):
    with open(os.path.join(ROOT, "csrc", "SOURCES")) as f:
        rows = [line.split() for line in f if line.strip() and not line.startswith("#")]
    return [path for k, path in rows if k == kind]


def extension_modules():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    use_cuda_env = os.environ.get("USE_CUDA")
    cuda_possible = CUDA_HOME is not None and torch.version.cuda is not None
    if use_cuda_env == "1" and not cuda_possible:
        sys.exit(f"USE_CUDA=1 but CUDA_HOME={CUDA_HOME} and torch.version.cuda={torch.version.cuda}")
    use_cuda = cuda_possible if use_cuda_env is None else (use_cuda_env == "1")
    if not use_cuda:
        why = "USE_CUDA=0" if use_cuda_env == "0" else (
            f"no CUDA toolkit (CUDA_HOME={CUDA_HOME})" if CUDA_HOME is None else f"torch {torch.__version__} is CPU-only")
        print(f"[sparseadapter_kernels] skipping CUDA kernels: {why}", flush=True)
    sources = read_sources("cpu") + read_sources("python") + (read_sources("cuda") if use_cuda else [])
    cxx = ["-O3", "-fopenmp", "-fvisibility=hidden"]
    extra = {"cxx": cxx}
    if use_cuda:
        # TORCH_CUDA_ARCH_LIST (e.g. "9.0" for the GPU at hand) is torch's own setting: honoured when set;
        # otherwise the two architectures the kernels are written for (A100, H100)
        arch = [] if os.environ.get("TORCH_CUDA_ARCH_LIST") else [
            "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + arch
    ext_cls = CUDAExtension if use_cuda else CppExtension
    return [ext_cls("sparseadapter_kernels._C", sources, extra_compile_args=extra, extra_link_args=["-fopenmp"],
                    define_macros=[("SAK_PYTHON_MODULE", "1")] + ([("SAK_WITH_CUDA", "1")] if use_cuda else []))]


def main():
    ext_modules, cmdclass = [], {}
    if os.environ.get("SAK_NO_EXTENSION") != "1":
        from torch.utils.cpp_extension import BuildExtension

        ext_modules = extension_modules()
        cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}
    setup(packages=find_packages(include=["sparseadapter_kernels", "sparseadapter_kernels.*"]),
          ext_modules=ext_modules, cmdclass=cmdclass)


if __name__ == "__main__":
    main()
