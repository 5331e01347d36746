"""Command line: ``python -m torch_iosparse explain|plan|bench|apply MODEL_FILE``.

MODEL_FILE is read with ``torch.load(weights_only=True)`` and may hold
  * the ``state_dict()`` of an IOSparseNetwork or of any model containing them (each network is rebuilt
    from its structure buffers with :meth:`IOSparseNetwork.from_state_dict`), or
  * a whole model saved with ``torch.save(model, path)`` — unpickling runs code from the file, so this
    needs ``--full-model`` (use it only for files you trust). A whole model that has not been converted
    is explained as ``sparsify(model)`` would convert it.

Networks are named as in Python, by their dotted module path (``2.ffn.0``; ``--network 2/ffn/0`` is read
the same). ``plan --save-dir DIR`` writes one plan file per network; ``apply MODEL_FILE DIR -o OUT`` puts
them back into the networks of the same names and writes the model (or state_dict) to OUT.
"""
from __future__ import annotations

import argparse
import difflib
import math
import os
import pickle
import re
import sys
import time
import zipfile
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .explain import (ROOT_NAME, apply_plans, explain, format_table, networks, plan_file_name, rows,
                      select_networks)
from ..files import atomic_write
from ..nn.module import IOSparseNetwork


def _one_line(e: BaseException) -> str:
    """``Type: first line of the message`` (library errors often span many lines)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    first = lines[0].split(". ")[0]  # the first sentence: torch's messages go on with advice
    return f"{type(e).__name__}: {first}"


def read_model_file(path: str, full_model: bool = False):
    """What ``path`` holds: an nn.Module or a state_dict (a dict of tensors). A file that is missing or holds
    neither raises SystemExit with a one-line message."""
    if not os.path.exists(path):
        raise SystemExit(f"{path}: no such file")
    if not os.path.isfile(path):  # a directory, FIFO or device: torch.load would fail or block
        raise SystemExit(f"{path}: not a regular file")
    if os.path.getsize(path) == 0:
        raise SystemExit(f"{path}: empty file")
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        torch_archive = zipfile.is_zipfile(path)  # what torch.save writes
        if not full_model:
            if isinstance(e, pickle.UnpicklingError) and torch_archive:
                raise SystemExit(f"{path}: not loadable with weights_only=True ({type(e).__name__}). If it is a whole "
                                 "model saved with torch.save(model) and you trust it, pass --full-model.") from None
            why = "cannot be unpickled" if isinstance(e, pickle.UnpicklingError) else _one_line(e)
            raise SystemExit(f"{path}: not a file saved by torch.save ({why})") from None
        try:
            obj = torch.load(path, weights_only=False, map_location="cpu")
        except Exception as e2:
            raise SystemExit(f"{path}: not a file saved by torch.save ({_one_line(e2)})") from None
    if isinstance(obj, nn.Module) or _is_state_dict(obj):
        return obj
    raise SystemExit(f"{path}: expected a state_dict or an nn.Module, got {type(obj).__name__}")


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def load_model_file(path: str, full_model: bool = False) -> nn.Module:
    """An nn.Module holding the networks of ``path`` (see the module docstring): the whole model, or for a
    state_dict a tree of plain modules in which each network sits at its dotted name (so its name and its
    state_dict keys are those of the original model). A file that is missing or holds no model raises
    SystemExit with a one-line message."""
    obj = read_model_file(path, full_model)
    return obj if isinstance(obj, nn.Module) else _from_state_dict(obj, path)


def _from_state_dict(sd: Dict[str, torch.Tensor], path: str) -> nn.Module:
    prefixes = sorted(k[: -len("in_ptr")] for k in sd if k == "in_ptr" or k.endswith(".in_ptr"))
    if not prefixes:
        raise SystemExit(f"{path}: this state_dict holds no IOSparseNetwork (no '*.in_ptr' entry)")
    holder, root = nn.Module(), None
    for p in prefixes:
        name = p[:-1] or ROOT_NAME
        try:
            net = IOSparseNetwork.from_state_dict(sd, prefix=p, cache=False)
        except (KeyError, ValueError, TypeError, RuntimeError) as e:  # GraphError / PlanError are ValueErrors
            raise SystemExit(f"{path}: the IOSparseNetwork state {name!r} cannot be rebuilt: "
                             f"{_one_line(e).split(': ', 1)[-1]}") from None
        if not p:
            root = net
            continue
        parent = holder
        *parents, leaf = name.split(".")
        try:
            for part in parents:
                if part not in parent._modules:
                    parent.add_module(part, nn.Module())
                parent = parent._modules[part]
            parent.add_module(leaf, net)
        except (KeyError, TypeError) as e:  # an empty name part, e.g. a key 'a..in_ptr'
            raise SystemExit(f"{path}: the state_dict key prefix {p!r} is not a module path ({_one_line(e)})") from None
    if root is not None:
        if len(prefixes) == 1:
            return root
        holder.add_module(ROOT_NAME, root)  # a network with networks inside: kept under its explain name
    return holder


def _selected(model: nn.Module, args) -> List[Tuple[str, IOSparseNetwork]]:
    """The networks the command works on: those named by --network (all by default), converting a copy of a
    model that holds none yet."""
    if not networks(model):
        model = _converted(model)
    return select_networks(model, args.network)


def cmd_explain(model: nn.Module, args) -> None:
    explain(model, plot=args.plot, names=args.network)


def cmd_plan(model: nn.Module, args) -> None:
    """Re-plan every network for --memory/--method and show the I/O next to the current plan."""
    table = []
    for name, net in _selected(model, args):
        replanned = IOSparseNetwork(net.to_dag(), memory=args.memory, method=args.method, seed=args.seed,
                                    time_budget=args.time_budget, cache=not args.no_cache)
        r_old, r_new = rows(net)[0], rows(replanned)[0]
        r_new["name"] = f"{name} (now)"
        r_old["name"] = f"{name} (was)"
        table += [r_old, r_new]
        if args.save_dir:
            os.makedirs(args.save_dir, exist_ok=True)
            out = os.path.join(args.save_dir, plan_file_name(name))
            replanned.plan().save(out)
            print(f"saved {out}")
    print(format_table(table))
    if args.save_dir:
        print(f"apply them with: python -m torch_iosparse apply {args.model_file} {args.save_dir} -o OUT_FILE")


def cmd_apply(obj, args) -> None:
    """Put the plans of --plan-dir into the networks of the same names and write the result to --output:
    the updated state_dict for a state_dict file (its other entries unchanged), else the whole model."""
    model = obj if isinstance(obj, nn.Module) else _from_state_dict(obj, args.model_file)
    if not networks(model):
        model = _converted(model)
        print("(model not converted yet: the plans go into sparsify(model), which is what is written)")
    before = {name: net.io.total for name, net in networks(model)}
    applied = apply_plans(model, args.plan_dir)
    for name, plan in applied.items():
        M = "unbounded" if plan.memory is None else plan.memory
        print(f"{name}: {plan.method} plan for M={M}, I/O {before[name]} -> {plan.io.total}")
    if isinstance(obj, nn.Module):
        out = model
    else:
        out = dict(obj)
        for name, net in networks(model):
            prefix = "" if name == ROOT_NAME else name + "."
            out.update((prefix + k, v) for k, v in net.state_dict().items())
    atomic_write(args.output, lambda f: torch.save(out, f))
    print(f"applied {len(applied)} plan{'s' if len(applied) != 1 else ''}; wrote {args.output}")


def _converted(model: nn.Module) -> nn.Module:
    from ..nn.sparsify import sparsify
    return sparsify(model)


def _time(fn, x, repeats: int) -> float:
    with torch.inference_mode():
        fn(x)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            fn(x)
            best = min(best, time.perf_counter() - t)
    return best


def cmd_bench(model: nn.Module, args) -> None:
    """Time each network (native op), the op's pure-PyTorch reference kernel (ops.reference_forward) and
    its dense nn.Sequential twin on random inputs (best of --repeats, side by side in one process)."""
    from .. import ops
    nets = _selected(model, args)
    print(f"batch={args.batch}, threads={torch.get_num_threads()}, best of {args.repeats}")
    print(f"{'network':24s} {'sparse ms':>10s} {'reference ms':>12s} {'dense ms':>10s} {'dense/sparse':>12s}")
    for name, net in nets:
        x = torch.randn(args.batch, net.n_inputs, dtype=net.weight.dtype)
        ts = _time(net, x, args.repeats)
        op_net, config = ops._op_args({k: getattr(net, "op_" + k) for k in net._op_keys}, net._op_meta)
        bias = nn.functional.pad(net.bias, (net.n_inputs, 0))
        tr = _time(lambda x: ops.reference_forward(x, net.weight, bias, op_net, config), x, args.repeats)
        try:
            td = _time(net.to_dense(), x, args.repeats)
            print(f"{name:24s} {ts * 1e3:10.3f} {tr * 1e3:12.3f} {td * 1e3:10.3f} {td / ts:12.2f}")
        except ValueError:  # a general DAG has no dense twin
            print(f"{name:24s} {ts * 1e3:10.3f} {tr * 1e3:12.3f} {'-':>10s} {'-':>12s}")


def _memory(s: str):
    """--memory: 'auto', 'unbounded' or an integer number of slots >= 2 (checked while parsing)."""
    from ..cost.iomodel import normalize_memory
    word = s.strip().lower()
    if word == "auto":
        return "auto"
    if word in ("unbounded", "inf", "infinite"):
        return None
    try:
        slots = int(word)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: expected 'auto', 'unbounded' or an integer >= 2") from None
    try:
        return normalize_memory(slots)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(kind):
    def parse(s: str):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
        if not (v > 0 and math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"{s!r}: must be a positive number")
        return v
    parse.__name__ = kind.__name__
    return parse


def _methods():
    from ..nn.module import _planning_methods
    return _planning_methods()


class _Parser(argparse.ArgumentParser):
    """argparse with a "did you mean" for a mistyped command, --method value or option."""

    def error(self, message: str):
        hint = _suggestion(message, self)
        super().error(message + (f"; did you mean {hint}?" if hint else ""))


def _suggestion(message: str, parser: argparse.ArgumentParser) -> Optional[str]:
    m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if m:
        choices = re.findall(r"'([^']*)'", m.group(2))
        close = difflib.get_close_matches(m.group(1), choices, n=1, cutoff=0.5)
        return repr(close[0]) if close else None
    m = re.search(r"unrecognized arguments: (.*)", message)
    if m:
        options = sorted({o for action in _all_actions(parser) for o in action.option_strings if o.startswith("--")})
        for word in m.group(1).split():
            if word.startswith("--"):
                close = difflib.get_close_matches(word.split("=")[0], options, n=1, cutoff=0.6)
                if close:
                    return repr(close[0])
    return None


def _all_actions(parser: argparse.ArgumentParser):
    for action in parser._actions:
        yield action
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_actions(sub)


def main(argv: List[str] = None) -> int:
    """Run the command line; returns the exit status. Bad options exit with status 2 (argparse's message,
    with the closest command or option for a typo), a missing or unusable model file, an unknown network
    name or an error the command meets (e.g. an unwritable --save-dir) print one line to stderr and
    return 1."""
    ap = _Parser(prog="python -m torch_iosparse", description=__doc__,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("model_file")
    common.add_argument("--full-model", action="store_true",
                        help="allow unpickling a whole model (runs code from the file: trusted files only)")
    select = argparse.ArgumentParser(add_help=False)
    select.add_argument("--network", action="append", metavar="NAME",
                        help="only this network (dotted name as explain prints it, e.g. 2.ffn.0); repeatable")
    p = sub.add_parser("explain", parents=[common, select], help="I/O table of every sparse network")
    p.add_argument("--plot", metavar="PNG", help="also draw I/O versus M with the bounds into this file")
    p = sub.add_parser("plan", parents=[common, select], help="re-plan every network and compare")
    p.add_argument("--memory", default="auto", type=_memory, help="fast-memory slots, 'auto' or 'unbounded'")
    p.add_argument("--method", default="two_optimal", choices=_methods())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=_positive(float), default=None)
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--save-dir", help="write each new plan as NAME.plan.npz here (the apply command reads them)")
    p = sub.add_parser("bench", parents=[common, select], help="time each network against its reference and dense twins")
    p.add_argument("--batch", type=_positive(int), default=256)
    p.add_argument("--repeats", type=_positive(int), default=5)
    p = sub.add_parser("apply", parents=[common], help="put the plans of a plan --save-dir folder into the model")
    p.add_argument("plan_dir", help="folder of NAME.plan.npz files (plan --save-dir)")
    p.add_argument("-o", "--output", required=True, metavar="OUT_FILE",
                   help="where to write the model (a state_dict file gets a state_dict; may be MODEL_FILE)")
    args = ap.parse_args(argv)
    try:
        if args.command == "apply":
            cmd_apply(read_model_file(args.model_file, args.full_model), args)
        else:
            model = load_model_file(args.model_file, args.full_model)
            {"explain": cmd_explain, "plan": cmd_plan, "bench": cmd_bench}[args.command](model, args)
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        print(f"{ap.prog}: error: {e.code}", file=sys.stderr)
        return 1
    except KeyError as e:  # an unknown --network or plan-file name (the message names the closest)
        print(f"{ap.prog}: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 1
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        # e.g. an unwritable --save-dir or --plot path, a plan made for another network, a network that
        # cannot be planned
        print(f"{ap.prog}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{ap.prog}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
