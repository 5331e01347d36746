"""benchmarks/gpu_speed.py --dry: the benchmark's correctness stage (and its table code) on CPU under the
Triton interpreter, so the script is known to work before a GPU is lent."""
import os
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def test_gpu_speed_dry_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    plot = tmp_path / "speed.png"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_speed.py"), "--dry", "--no-progress",
                        "--plot", str(plot)],
                       capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "correctness stage passed" in r.stdout
    assert r.stdout.count("  ok  ") == 2
    assert "| radix | 16 |" in r.stdout and "| mlp | 12 |" in r.stdout
    assert "appended" not in r.stdout  # a dry run never writes RESULTS.md
    assert plot.exists() and plot.stat().st_size > 1000
