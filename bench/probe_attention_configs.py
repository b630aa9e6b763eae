"""Every autotuning candidate of the attention kernels, launched explicitly on each read path
(pointer, TMA): which compile, which are right (against the float64 reference at a small
shape), and with --time how long each kernel takes at the benchmark's shapes (GPU kernel time
from torch.profiler, the other kernels at their first candidate), beside SDPA's kernels with
and without dropout.

    python bench/probe_attention_configs.py [--length 1024] [--heads 4]
    python bench/probe_attention_configs.py --time --shapes 8,12,1024,64 --causal 0 1 --csv probe.csv
"""

import argparse
import collections
import csv
import itertools

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from slicecompile import draw_attention_mask, dropout_attention_reference
from slicecompile.kernels import attention_backward, attention_forward
from slicecompile.kernels.attention_backward import GRAD_KV, GRAD_Q
from slicecompile.kernels.attention_forward import FORWARD

KERNELS = [("forward", FORWARD), ("dk_dv", GRAD_KV), ("dq", GRAD_Q)]
BLOCK = (128, 128)


def operands(B, H, L, E, dtype, device, p, causal, policy="dropout"):
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, L, E, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = draw_attention_mask(B, H, L, L, p, BLOCK, device=device, policy=policy, is_causal=causal)
    return q, k, v, mask


def ours(q, k, v, mask, causal, configs, tma):
    """A callable running our forward and backward kernels with configs (forward, dK/dV, dQ)."""
    E = q.shape[-1]
    common = (mask.tiles, mask.block, mask.scale, E**-0.5)
    grad = torch.randn(*q.shape[:3], v.shape[-1], device=q.device, dtype=q.dtype)
    paths = dict(tma=tma, drop_keys=mask.policy == "dropkey")

    def step():
        out, lse = attention_forward(
            q.detach(), k.detach(), v.detach(), *common, None, causal, config=configs[0], **paths
        )
        grads = attention_backward(grad, q.detach(), k.detach(), v.detach(), out, lse, *common, None, causal,
                                   configs=configs[1:], **paths)  # fmt: skip
        return out, grads[:3], grad

    return step


def sdpa(q, k, v, grad, p, causal):
    """A callable running SDPA's forward and backward."""

    def step():
        F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal).backward(grad)
        q.grad = k.grad = v.grad = None

    return step


def error(q, k, v, mask, causal, configs, tma):
    """The largest relative error of our output and gradients against the float64 reference's
    (on leaves of its own: gradients must not pile up over the candidates)."""
    out, (dq, dk, dv), grad = ours(q, k, v, mask, causal, configs, tma)()
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = dropout_attention_reference(*leaves, mask, is_causal=causal)
    ref.backward(grad.double())
    pairs = zip((out, dq, dk, dv), (ref, *(t.grad for t in leaves)))
    return max(((a.double() - b).norm() / b.norm()).item() for a, b in pairs)


def kernel_times(fn, steps=10):
    """{kernel name: mean GPU ms per call of fn} from torch.profiler."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    times = collections.Counter()
    for event in prof.key_averages():
        if event.self_device_time_total:
            times[event.key[:60]] += event.self_device_time_total / steps / 1000
    return times


def as_config(c):
    return dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)


def describe(c):
    return f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}"


def check_all(args):
    for E, tma, causal in itertools.product((64, 128), (False, True), (False, True)):
        q, k, v, mask = operands(1, args.heads, args.length, E, torch.bfloat16, args.device, 0.3, causal)
        for index, (name, kernel) in enumerate(KERNELS):
            for c in kernel.candidates(2, E, E, BLOCK):
                configs = [None, None, None]
                configs[index] = as_config(c)
                try:
                    err = error(q, k, v, mask, causal, configs, tma)
                    verdict, result = ("ok" if err < 2e-2 else "WRONG"), f"{err:.2e}"
                except Exception as e:  # a compiler failure is a result here
                    verdict, result = "FAILED", f"{type(e).__name__}: {str(e).splitlines()[-1][:120]}"
                path = "tma" if tma else "ptr"
                print(f"E={E} {path} causal={int(causal)} {name:8} {describe(c):16} {verdict:6} {result}", flush=True)


def time_all(args):
    """Rows of every candidate's kernel time at each shape, and SDPA's kernels."""
    rows, gpu = Rows(args.csv), torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    for shape, causal in itertools.product(args.shapes, args.causal):
        B, H, L, E = shape
        q, k, v, mask = operands(B, H, L, E, torch.bfloat16, args.device, args.p, bool(causal), args.policy)
        base = dict(gpu=gpu, shape=",".join(map(str, shape)), causal=causal, p=args.p, policy=args.policy)
        grad = torch.randn_like(q)
        for name, p in (("sdpa", 0.0), ("sdpa_dropout", args.p)):
            times = kernel_times(sdpa(q, k, v, grad, p, bool(causal)))
            rows.append(base | dict(path="-", kernel=name, config="-", ms=sum(times.values()), error=""))
            print(f"{base['shape']} c{causal} {name}: " + ", ".join(f"{n} {t:.3f}" for n, t in times.items()))
        for path, index in itertools.product(args.paths, range(len(KERNELS))):
            name, kernel = KERNELS[index]
            tma = path == "tma"
            firsts = [as_config(each.candidates(2, E, E, BLOCK)[0]) for _, each in KERNELS]
            for c in kernel.candidates(2, E, E, BLOCK)[: 1 if args.first else None]:
                configs = firsts[:index] + [as_config(c)] + firsts[index + 1 :]
                try:
                    times = kernel_times(ours(q, k, v, mask, bool(causal), configs, tma))
                    ms = next(t for n, t in times.items() if n.startswith(kernel.kernel.__name__))
                    total, note = sum(times.values()), ""
                except Exception as e:  # a compiler failure is a result here
                    ms, total, note = float("nan"), float("nan"), f"{type(e).__name__}: {str(e).splitlines()[-1][:80]}"
                rows.append(base | dict(path=path, kernel=name, config=describe(c), ms=ms, error=note))
                print(f"{base['shape']} c{causal} {path} {name:8} {describe(c):16} {ms:.3f} (all {total:.3f}) {note}")
    summary(rows)


class Rows(list):
    """A list of row dicts that also appends each to a CSV file as it comes (None: no file)."""

    def __init__(self, path):
        super().__init__()
        self.path = path

    def append(self, row):
        super().append(row)
        if self.path:
            with open(self.path, "a", newline="") as f:
                writer = csv.DictWriter(f, list(row))
                writer.writeheader() if not f.tell() else None
                writer.writerow(row)


def summary(rows):
    """Per shape: SDPA's fwd+bwd kernel ms, and per kernel and path the first candidate's ms and
    the fastest candidate with its ms."""
    print("\nSummary (GPU ms): shape causal | sdpa sdpa_dropout | kernel path: first -> best (config)")
    for (shape, causal), group in itertools.groupby(rows, lambda r: (r["shape"], r["causal"])):
        group = list(group)
        base = {r["kernel"]: r["ms"] for r in group if r["path"] == "-"}
        cells = []
        for (kernel, path), mine in itertools.groupby(
            [r for r in group if r["path"] != "-"], lambda r: (r["kernel"], r["path"])
        ):
            mine = [r for r in mine if r["ms"] == r["ms"]]
            if mine:
                best = min(mine, key=lambda r: r["ms"])
                cells.append(f"{kernel} {path}: {mine[0]['ms']:.3f} -> {best['ms']:.3f} ({best['config']})")
        print(f"{shape} c{causal} | {base.get('sdpa', 0):.3f} {base.get('sdpa_dropout', 0):.3f} | " + "; ".join(cells))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--time", action="store_true", help="time every candidate instead of checking it")
    parser.add_argument("--shapes", nargs="+", default=["8,12,1024,64", "4,16,2048,128"])
    parser.add_argument("--causal", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--paths", nargs="+", choices=("ptr", "tma"), default=["ptr"])
    parser.add_argument("--policy", choices=("dropout", "dropkey"), default="dropout")
    parser.add_argument("--first", action="store_true", help="time each kernel's first candidate only")
    parser.add_argument("--csv")
    args = parser.parse_args()
    args.shapes = [tuple(map(int, s.split(","))) for s in args.shapes]
    time_all(args) if args.time else check_all(args)


if __name__ == "__main__":
    main()
