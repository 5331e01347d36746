"""Times DeepSparse on one exported ONNX model; runs inside benchmarks/.deepsparse-venv (made by
benchmarks/deepsparse_venv.sh), called by benchmarks/cpu_speed.py through subprocess.

    .deepsparse-venv/bin/python deepsparse_runner.py MODEL.onnx CHECK.npz --threads T --rounds R

CHECK.npz holds, per batch size B, ``x_B`` (a [B, n_in] float32 input) and ``ref_B`` (the dense PyTorch
model's output on it). For each B: compile the engine (``deepsparse.compile_model(onnx, batch_size=B,
num_cores=T)``), check its output on ``x_B`` against ``ref_B`` (so a wrong engine is never timed), warm
up, then time best of R calls (more while under --min-time seconds: the engine runs alone in its process, so
it cannot be interleaved with the other methods, and a core taken by another process costs a worker a
scheduler slice). Prints one JSON line on stdout: {"version", "results": {B: seconds or
null}, "errors": {B: message}, "compile_s": {B: seconds}, "calls": {B: timed calls}}.
Only numpy and deepsparse here: the DeepSparse venv has no torch.
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")  # no usage reporting from a benchmark

import numpy as np  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("onnx")
    ap.add_argument("check")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--min-time", type=float, default=0.2,
                    help="keep timing past --rounds calls until this many seconds went by (best of all calls)")
    ap.add_argument("--rtol", type=float, default=1e-3)
    ap.add_argument("--atol", type=float, default=1e-3)
    args = ap.parse_args()

    import deepsparse
    data = np.load(args.check)
    batches = sorted(int(k[2:]) for k in data.files if k.startswith("x_"))
    out = {"version": deepsparse.__version__, "results": {}, "errors": {}, "compile_s": {}, "calls": {}}
    for B in batches:
        x = np.ascontiguousarray(data[f"x_{B}"], dtype=np.float32)
        ref = data[f"ref_{B}"]
        try:
            t0 = time.perf_counter()
            engine = deepsparse.compile_model(args.onnx, batch_size=B, num_cores=args.threads)
            out["compile_s"][B] = time.perf_counter() - t0
            y = engine.run([x])[0]
            if y.shape != ref.shape:
                raise AssertionError(f"output shape {y.shape} != reference {ref.shape}")
            err = np.abs(y - ref) - (args.atol + args.rtol * np.abs(ref))
            if not np.all(err <= 0):
                raise AssertionError(f"output differs from the dense model: max abs diff "
                                     f"{np.abs(y - ref).max():.3g}")
            for _ in range(args.warmup):
                engine.run([x])
            best, calls, start = float("inf"), 0, time.perf_counter()
            while calls < args.rounds or time.perf_counter() - start < args.min_time:
                t0 = time.perf_counter()
                engine.run([x])
                best = min(best, time.perf_counter() - t0)
                calls += 1
            out["results"][B] = best
            out["calls"][B] = calls
        except Exception as e:  # noqa: BLE001  (reported to the caller, which prints it)
            out["results"][B] = None
            out["errors"][B] = f"{type(e).__name__}: {e}"
    sys.stdout.flush()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
