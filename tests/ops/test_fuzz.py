"""Bounded fuzzing (torch_iosparse/testing/fuzz_cases.py): random mutations of every op buffer, every config value and the
state dict must raise or run, never crash or hang. Each batch of cases runs in its own process, so a crash
fails this test with the case that caused it. IOSPARSE_FUZZ_CASES sets the number of cases (default 1000;
a longer run: IOSPARSE_FUZZ_CASES=20000 pytest tests/ops/test_fuzz.py)."""
import os
import subprocess
import sys

import pytest

CASES = int(os.environ.get("IOSPARSE_FUZZ_CASES", "1000"))
BATCHES = 2


def run_cases(seed, first, count, timeout):
    cmd = [sys.executable, "-m", "torch_iosparse.testing.fuzz_cases", str(seed), str(first), str(count)]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        last = [l for l in out.splitlines() if l.startswith("case ")][-1:] or ["before the first case"]
        pytest.fail(f"fuzz run hung at {last[0]} (reproduce: python -m torch_iosparse.testing.fuzz_cases {seed} "
                    f"{last[0].split()[-1] if last[0].startswith('case') else first} 1)")
    lines = r.stdout.splitlines()
    if r.returncode != 0 or not lines or lines[-1] != "done":
        last = [l for l in lines if l.startswith("case ")][-1:] or ["before the first case"]
        pytest.fail(f"fuzz process died (exit {r.returncode}) at {last[0]}; reproduce: python -m torch_iosparse.testing.fuzz_cases "
                    f"{seed} {last[0].split()[-1] if last[0].startswith('case') else first} 1\n{r.stderr[-3000:]}")
    return sum(l.startswith("case ") for l in lines)


@pytest.mark.parametrize("batch", range(BATCHES))
def test_fuzz_never_crashes_or_hangs(batch):
    per = (CASES + BATCHES - 1) // BATCHES
    seed = int(os.environ.get("IOSPARSE_FUZZ_SEED", "2026"))
    assert run_cases(seed, batch * per, per, timeout=60 + per) == per
