"""python -m slicecompile demo: check dropout_linear against its dense reference, then time it
against F.dropout + F.linear on whatever device is present."""

import argparse

import torch
import torch.nn.functional as F

from . import DEFAULT_BLOCK, draw_block_mask, dropout_linear, dropout_linear_reference, dropout_linear_with_mask
from .timing import median_ms

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check(device, dtype, block):
    """Relative error of forward and gradients against a float64 reference under one mask."""
    torch.manual_seed(0)
    x = torch.randn(3, 300, 520, device=device).to(dtype).requires_grad_()
    w = (torch.randn(260, 520, device=device) / 520**0.5).to(dtype).requires_grad_()
    mask = draw_block_mask(900, 520, 0.5, block, device=device)
    y = dropout_linear_with_mask(x, w, None, mask)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    ref = dropout_linear_reference(x64, w64, None, mask)
    ref.backward(dy.double())
    pairs = {"y": (y, ref), "dx": (x.grad, x64.grad), "dw": (w.grad, w64.grad)}
    return {k: ((a.double() - b).norm() / b.norm()).item() for k, (a, b) in pairs.items()}


def time_providers(device, dtype, shape, p, block):
    """Median ms of forward and forward+backward for each provider."""
    M, K, N = shape
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(N, K, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(M, N, device=device, dtype=dtype)
    providers = {
        "F.linear": lambda: F.linear(x, w),
        "F.dropout + F.linear": lambda: F.linear(F.dropout(x, p), w),
        "slicecompile.dropout_linear": lambda: dropout_linear(x, w, p=p, block=block),
    }
    rows = []
    for name, fn in providers.items():
        with torch.no_grad():
            fwd = median_ms(fn, device)
        full = median_ms(lambda fn=fn: fn().backward(dy), device, grad_to_none=[x, w])
        rows.append((name, fwd, full))
    return rows


def main(argv=None):
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="python -m slicecompile demo", description=__doc__)
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16" if cuda else "float32")
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        metavar=("M", "K", "N"),
        default=(8192, 4096, 4096) if cuda else (1024, 1024, 1024),
    )
    parser.add_argument("--p", type=float, default=0.5)
    parser.add_argument("--block", type=int, nargs=2, default=DEFAULT_BLOCK)
    args = parser.parse_args(argv)
    dtype, block = DTYPES[args.dtype], tuple(args.block)

    errors = check(args.device, dtype, block)
    ok = all(err < (1e-5 if dtype == torch.float32 else 2e-2) for err in errors.values())
    print(
        f"check on {args.device}, {args.dtype}, block {block}: "
        + ", ".join(f"{k} rel. error {v:.1e}" for k, v in errors.items())
        + (" -> OK" if ok else " -> FAILED")
    )
    if not ok:
        return 1
    if args.device == "cpu":
        print("(on a CPU the op runs its pure-PyTorch path: correct, not fast; the speed-up needs a GPU)")
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"\n{name}, {args.dtype}, (M, K, N) = {tuple(args.shape)}, p = {args.p}: median ms")
    print(f"{'provider':<30}{'forward':>10}{'fwd+bwd':>10}")
    for provider, fwd, full in time_providers(args.device, dtype, args.shape, args.p, block):
        print(f"{provider:<30}{fwd:>10.3f}{full:>10.3f}")
    return 0
