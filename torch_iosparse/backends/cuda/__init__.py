"""The CUDA backend: :mod:`.triton_kernels` (the Triton plan executor and level kernel) and :mod:`.gpu`
(the op's CUDA kernels registered with ``torch.library``, the optional CUDA C++ kernel). Needs Triton;
``import torch_iosparse`` imports :mod:`.gpu` when CUDA is available."""
