#!/usr/bin/env bash
# Compiles every native source of the extension (kernels/**/*.cpp, not kernels/cuda) for aarch64 with the
# Debian cross compiler, against this machine's torch and Python headers: the x86-only parts (AVX-512 / AVX2
# variants, intrinsics, __builtin_cpu_supports, _mm_pause / _mm_prefetch) must stay behind their guards
# (docs/cpu-kernel.md "Source layout"). Nothing is linked or run; objects go to /dev/null.
#
#   bash scripts/cross_check.sh            (make cross-check)
#
# PY: the Python whose torch headers are used (default .venv/bin/python, else python3).
# CROSS_CXX: the compiler (default aarch64-linux-gnu-g++, installed with apt-get if missing; needs root).
# CROSS_MODE=syntax: -fsyntax-only instead of a full -O2 compile (faster, checks less).
# JOBS: parallel compiles (default: the number of CPUs).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
CXX="${CROSS_CXX:-aarch64-linux-gnu-g++}"
JOBS="${JOBS:-$(nproc)}"

if ! command -v "$CXX" >/dev/null 2>&1; then
  if [ "$CXX" != aarch64-linux-gnu-g++ ]; then
    echo "cross_check: $CXX not found" >&2
    exit 2
  fi
  echo "cross_check: installing g++-aarch64-linux-gnu (apt-get)" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq g++-aarch64-linux-gnu >/dev/null
fi

TORCH_INC="$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))')"
PY_INC="$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")"
[ -d "$TORCH_INC" ] || { echo "cross_check: no torch headers at $TORCH_INC" >&2; exit 2; }

if [ "${CROSS_MODE:-full}" = syntax ]; then
  OUT_FLAGS=(-fsyntax-only)
else
  OUT_FLAGS=(-O2 -c -o /dev/null)
fi
# Same defines as the extension build (setup.py via torch.utils.cpp_extension); torch's and Python's
# headers as system headers, so only warnings of our own sources are shown.
FLAGS=(-std=c++17 -fopenmp -fno-math-errno -Wall -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C
       -Ikernels -isystem "$TORCH_INC" -isystem "$TORCH_INC/torch/csrc/api/include" -isystem "$PY_INC")

mapfile -t SOURCES < <(find kernels -name '*.cpp' -not -path 'kernels/cuda/*' | sort)
echo "cross_check: $("$CXX" --version | head -1); ${#SOURCES[@]} sources; torch headers $TORCH_INC" >&2

LOG="$(mktemp -d)"
trap 'rm -rf "$LOG"' EXIT
export CXX LOG
export FLAGS_STR="${FLAGS[*]} ${OUT_FLAGS[*]}"
printf '%s\n' "${SOURCES[@]}" | xargs -P "$JOBS" -I{} bash -c '
  f="{}"; log="$LOG/$(echo "$f" | tr / _).log"
  if $CXX $FLAGS_STR "$f" >"$log" 2>&1; then echo "ok   $f"; else echo "FAIL $f"; touch "$log.failed"; fi'

status=0
for f in "${SOURCES[@]}"; do
  log="$LOG/$(echo "$f" | tr / _).log"
  if [ -s "$log" ]; then
    echo "---- $f" >&2
    cat "$log" >&2
  fi
  [ -e "$log.failed" ] && status=1
done
if [ $status -eq 0 ]; then
  echo "cross_check: all ${#SOURCES[@]} sources compile for aarch64" >&2
else
  echo "cross_check: FAILED" >&2
fi
exit $status
