"""The Triton kernel compiles with Triton's real CUDA compiler for sm_90 (H100/H200) down to a cubin —
no GPU needed. The interpreter tests check what the kernel computes; this checks that the same source
is valid Triton for the GPU, for float32, float16 and bfloat16 inputs. Runs in a subprocess because
the interpreter (TRITON_INTERPRET=1, set by conftest) replaces the compiler in this process.
The plan executor and the three level kernels."""
import os
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))

SCRIPT = r"""
import sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton
from torch_iosparse.backends.cuda import triton_kernels as tk

fn = tk._iosparse_forward_kernel
for io_t in ("fp32", "fp16", "bf16"):
    sig = {}
    for n in fn.arg_names:
        if n in ("M", "BT", "KC"):
            sig[n] = "constexpr"
        elif n in ("x_ptr", "y_ptr", "w_ptr", "b_ptr"):
            sig[n] = "*" + io_t
        elif n in ("slow_ptr", "scratch_ptr", "act_lo_ptr", "act_hi_ptr"):
            sig[n] = "*fp32"
        elif n.endswith("_ptr"):
            sig[n] = "*i32"
        else:
            sig[n] = "i64" if n.startswith("stride") or n == "B" else "i32"
    # a 64-column tile (large batches) and a 1-column tile (B = 1), as choose_tiling picks them
    for BT, KC, warps in ((64, 16, 4), (1, 16, 1)):
        src = ASTSource(fn, sig, constexprs={"M": 128, "BT": BT, "KC": KC})
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        assert len(k.asm["cubin"]) > 1000, io_t
        assert "bar.sync" in k.asm["ptx"] or "barrier.sync" in k.asm["ptx"], "the step barriers are missing"
        assert "ld.global.nc" not in k.asm["ptx"], "slot reads must not use the non-coherent path"
        print("compiled", io_t, BT, len(k.asm["cubin"]))
    lsig = {}
    for n in tk._iosparse_level_kernel.arg_names:
        if n in ("BT", "KC"):
            lsig[n] = "constexpr"
        elif n in ("w_ptr", "b_ptr"):
            lsig[n] = "*" + io_t
        elif n in ("vals_ptr", "act_lo_ptr", "act_hi_ptr"):
            lsig[n] = "*fp32"
        elif n == "in_ptr_ptr":
            lsig[n] = "*i64"
        elif n.endswith("_ptr"):
            lsig[n] = "*i32"
        else:
            lsig[n] = "i64"
    for BT, KC in ((1, 128), (64, 32)):
        k = triton.compile(ASTSource(tk._iosparse_level_kernel, lsig, constexprs={"BT": BT, "KC": KC}),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        assert len(k.asm["cubin"]) > 1000
        print("compiled level", io_t, BT, len(k.asm["cubin"]))
    for kern, i64_ptr, shapes in (
            # level_rows at B = 1 and B = 64; blocks of 32 neurons: broadcast form (1 column), dot form (64)
            (tk._iosparse_level_rows_kernel, "in_ptr_ptr", [({"R": 128, "BT": 1, "KC": 32}, 8),
                                                            ({"R": 8, "BT": 64, "KC": 32}, 8)]),
            (tk._iosparse_level_block_kernel, "blk_uptr_ptr", [({"R": 32, "BT": 1, "UC": 16, "USE_DOT": False}, 2),
                                                               ({"R": 32, "BT": 64, "UC": 16, "USE_DOT": True}, 4)])):
        sig = {}
        for n in kern.arg_names:
            if n in shapes[0][0]:
                sig[n] = "constexpr"
            elif n in ("w_ptr", "b_ptr"):
                sig[n] = "*" + io_t
            elif n == "vals_ptr":
                sig[n] = "*fp32"
            elif n.endswith("_ptr"):
                sig[n] = "*i64" if n == i64_ptr else "*i32"
            elif n in ("lo", "hi"):
                sig[n] = "fp32"
            else:
                sig[n] = "i64" if n in ("B", "stride_v") else "i32"
        for consts, warps in shapes:
            k = triton.compile(ASTSource(kern, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": warps})
            assert len(k.asm["cubin"]) > 1000
            print("compiled", kern.__name__, io_t, consts, len(k.asm["cubin"]))
"""


def test_triton_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    assert r.stdout.count("compiled") == 24
