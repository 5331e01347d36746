#!/usr/bin/env bash
# Creates benchmarks/.deepsparse-venv: DeepSparse 1.8 (Neural Magic's CPU inference engine for pruned
# models), kept apart from the project's .venv because it pins onnx < 1.15 and numpy < 2.
# benchmarks/cpu_speed.py uses it when present (benchmarks/deepsparse_runner.py runs inside it).
#
#   bash benchmarks/deepsparse_venv.sh           # create it if missing (about 1 minute; ~300 MB)
#   bash benchmarks/deepsparse_venv.sh --force   # recreate it
#
# deepsparse 1.8.0 has wheels for CPython 3.8-3.11 only (Requires-Python <3.12): PYTHON (default: the
# first of python3.11, python3.10, python3.9, python3 that is 3.8-3.11) picks the interpreter.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.deepsparse-venv"

if [[ "${1:-}" == "--force" ]]; then
    rm -rf "$venv"
fi
if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c "import deepsparse" 2>/dev/null; then
    echo "$venv: deepsparse $("$venv/bin/python" -c 'import deepsparse; print(deepsparse.__version__)') already installed"
    exit 0
fi

ok_python() {  # a CPython 3.8-3.11 with the venv module
    "$1" -c 'import sys, venv; sys.exit(not ((3, 8) <= sys.version_info[:2] <= (3, 11)))' 2>/dev/null
}
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
    for cand in python3.11 python3.10 python3.9 python3 \
                /root/.pyenv/versions/3.11*/bin/python3 /root/.pyenv/versions/3.10*/bin/python3; do
        if command -v "$cand" >/dev/null 2>&1 && ok_python "$cand"; then py="$cand"; break; fi
    done
fi
if [[ -z "$py" ]] || ! ok_python "$py"; then
    echo "deepsparse_venv.sh: no CPython 3.8-3.11 found (deepsparse 1.8.0 has no wheel for newer ones); set PYTHON=" >&2
    exit 1
fi

echo "creating $venv with $("$py" --version 2>&1)"
rm -rf "$venv"
"$py" -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet "deepsparse==1.8.0" "onnx==1.14.1" "numpy<2"
"$venv/bin/python" - <<'EOF'
import deepsparse, numpy, onnx
print(f"deepsparse {deepsparse.__version__}, onnx {onnx.__version__}, numpy {numpy.__version__}")
EOF
echo "ok: $venv"
