"""Build torch_iosparse and its native extension ``torch_iosparse._C``.

Every ``.cpp`` file under ``kernels/`` (except ``kernels/cuda``) is compiled into one CPU extension.
The ops register themselves with ``TORCH_LIBRARY_FRAGMENT(iosparse, ...)`` so each file stays
independent. Build with ``pip install --no-build-isolation -e .`` (see README): build isolation would
pull a CUDA torch and compile against the wrong headers.
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def native_sources():
    files = sorted(glob.glob(os.path.join("kernels", "**", "*.cpp"), recursive=True))
    return [f for f in files if os.sep + "cuda" + os.sep not in f]


# -O3 with AVX2/FMA function multiversioning is decided in the sources; the baseline flags must run
# on any x86-64 CI machine. -fopenmp at compile *and* link time, or at::parallel_for runs on 1 thread.
extra_compile = ["-O3", "-fopenmp", "-std=c++17", "-fno-math-errno"]
extra_link = ["-fopenmp"]
# IOSPARSE_SANITIZE=1: an AddressSanitizer + UBSan build for `make asan-test` (scripts/asan_test.sh).
if os.environ.get("IOSPARSE_SANITIZE") == "1":
    sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-g"]
    extra_compile = ["-O1", "-fopenmp", "-std=c++17", "-fno-math-errno"] + sanitize
    extra_link = ["-fopenmp"] + sanitize

setup(
    name="torch_iosparse",
    version="0.1.0",
    description="I/O-efficient inference of sparse (pruned) neural networks for PyTorch",
    packages=find_packages(include=["torch_iosparse", "torch_iosparse.*"]),
    ext_modules=[
        CppExtension(
            "torch_iosparse._C",
            native_sources(),
            include_dirs=[os.path.join(HERE, "kernels")],
            extra_compile_args={"cxx": extra_compile},
            extra_link_args=extra_link,
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy", "tqdm"],
)
