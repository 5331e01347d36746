"""Vector stack traffic in the innermost loops of the CPU kernel variants (docs/cpu-kernel.md "Source layout").

Disassembles the extension (objdump -d -C), takes every function whose name matches PATTERN (default: the
per-ISA tile wrappers of the program, panel and block paths), finds its innermost loops (backward jumps whose
range holds no other loop) and counts the instructions in them that move a vector register (xmm/ymm/zmm) to
or from the stack ((%rsp), or (%rbp) where the function sets up a frame pointer): accumulator spills.

    python scripts/stack_traffic.py torch_iosparse/_C*.so [--pattern REGEX] [--compare OTHER.so]

Prints one line per function (innermost loops, instructions in them, vector stack accesses in them); with
--compare, the same for another build side by side. Exit status 1 if any matched function has vector stack
traffic in an innermost loop (in the first .so).
"""
import argparse
import re
import subprocess
import sys
from collections import OrderedDict

DEFAULT_PATTERN = r"(program_tile|panel_tile|block_chunk)_(avx2|avx512|generic)<"
FUNC = re.compile(r"^[0-9a-f]+ <(.*)>:$")
INSN = re.compile(r"^\s*([0-9a-f]+):\s+(\S+)\s*(.*)$")
JUMP_TARGET = re.compile(r"^([0-9a-f]+)\b")
VREG = re.compile(r"%[xyz]mm\d+")
# A vector multiply-add (FMA, or the mul + add of the SSE2 build) marks an accumulator loop.
FMA = re.compile(r"v?f(n)?m(add|sub)\d*p[sd]|v?mulp[sd]")


def functions(so, pattern):
    out = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", so], check=True, capture_output=True,
                         text=True).stdout
    want = re.compile(pattern)
    funcs, name, body = OrderedDict(), None, []
    for line in out.splitlines():
        m = FUNC.match(line)
        if m:
            if name is not None:
                funcs[name] = body
            name, body = (m.group(1) if want.search(m.group(1)) else None), []
            continue
        if name is None:
            continue
        m = INSN.match(line)
        if m:
            body.append((int(m.group(1), 16), m.group(2), m.group(3)))
    if name is not None:
        funcs[name] = body
    return funcs


def analyse(body):
    frame = any(op == "mov" and args.replace(" ", "") == "%rsp,%rbp" for _, op, args in body)
    stack = re.compile(r"\(%rsp\)|\(%rbp\)" if frame else r"\(%rsp\)")
    loops = []
    for addr, op, args in body:
        if op.startswith("j"):
            m = JUMP_TARGET.match(args)
            if m and int(m.group(1), 16) <= addr:
                loops.append((int(m.group(1), 16), addr))
    inner = [l for l in set(loops) if not any(o != l and l[0] <= o[0] and o[1] <= l[1] for o in loops)]
    acc_loops = insns = spills = other = 0
    for lo, hi in inner:
        loop = [(op, args) for addr, op, args in body if lo <= addr <= hi]
        if any(op.startswith("call") for op, _ in loop):
            continue  # a scalar activation loop (erf / tanh / exp calls): saves around the call, no accumulators
        n_stack = sum(1 for _, args in loop if VREG.search(args) and stack.search(args))
        if any(FMA.match(op) for op, args in loop if VREG.search(args)):
            acc_loops += 1
            insns += len(loop)
            spills += n_stack
        else:
            other += n_stack
    return acc_loops, insns, spills, other


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("so")
    ap.add_argument("--pattern", default=DEFAULT_PATTERN)
    ap.add_argument("--compare", help="another build of the extension (e.g. before a change)")
    a = ap.parse_args()
    # Keyed by the short name (ISA wrapper and template arguments), so that builds whose parameter types
    # moved between namespaces still line up.
    short = lambda n: re.sub(r"\(.*", "", re.sub(r"^.*?iosparse::(\(anonymous namespace\)::)?", "", n))
    cur = {short(k): analyse(v) for k, v in functions(a.so, a.pattern).items()}
    old = {short(k): analyse(v) for k, v in functions(a.compare, a.pattern).items()} if a.compare else {}
    bad = 0
    head = f"{'loops':>5s} {'insns':>6s} {'spills':>6s} {'other':>5s}"
    print(f"{'function':36s} {head}" + (f"   | before: {head}" if a.compare else ""))
    for name in sorted(set(cur) | set(old)):
        c = cur.get(name)
        fmt = lambda r: f"{r[0]:5d} {r[1]:6d} {r[2]:6d} {r[3]:5d}" if r else f"{'missing':>25s}"
        line = f"{name:36s} {fmt(c)}"
        if a.compare:
            line += f"   | {fmt(old.get(name))}"
        bad += bool(c and c[2])
        print(line)
    print(f"{len(cur)} functions, {bad} with vector stack traffic in an innermost accumulator loop")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
