"""Kernels' Python side, per device: :mod:`.cpu` (hardware detection, the cost model of the CPU paths and
the measured strategy choice; the C++ kernels are in kernels/cpu/) and :mod:`.cuda` (Triton kernels and
the optional CUDA C++ kernel, registered for ``iosparse::dag_forward`` on CUDA tensors; imported by the
package only when CUDA is available)."""
from . import cpu

__all__ = ["cpu"]
