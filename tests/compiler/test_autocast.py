"""The ops under torch.autocast and GradScaler: they compute in autocast's dtype, as F.linear
and F.conv2d do, so a mixed-precision training loop needs no change."""

import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

from slicecompile import dropout_linear
from slicecompile.compiler.backend import slicecompile_backend
from slicecompile.ops.dropout_conv2d import dropout_conv2d

from conftest import DEVICE

P, BLOCK = 0.5, (16, 16)
DTYPES = [torch.bfloat16, torch.float16]
LINEAR = {
    "block": functools.partial(dropout_linear, p=P, block=BLOCK),
    "slice": functools.partial(dropout_linear, p=P, policy="slice"),
}
CONV = {policy: functools.partial(dropout_conv2d, p=P, padding=1, policy=policy) for policy in ("block", "slice")}


def _operands(kind):
    torch.manual_seed(0)
    if kind == "linear":
        shapes = [(40, 64), (24, 64), (24,)]
    else:
        shapes = [(4, 32, 6, 6), (8, 32, 3, 3), (8,)]
    return [torch.randn(shape, requires_grad=True) for shape in shapes]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("kind", "policy"), [(k, p) for k in ("linear", "conv") for p in ("block", "slice")])
def test_follows_the_autocast_dtype(kind, policy, dtype):
    """Under autocast the op equals the op on operands cast by hand, in autocast's dtype, like
    F.linear/F.conv2d; the gradients reach the float32 leaves in float32."""
    op, dense = (LINEAR[policy], F.linear) if kind == "linear" else (CONV[policy], F.conv2d)
    x, weight, bias = _operands(kind)
    with torch.autocast(DEVICE, dtype=dtype):
        assert dense(x, weight, bias).dtype == dtype
        torch.manual_seed(1)
        out = op(x, weight, bias)
        # autocast's own casts: a bfloat16 activation meeting a float32 weight is fine too
        torch.manual_seed(1)
        mixed = op(x.detach().to(dtype), weight, bias)
    torch.manual_seed(1)
    by_hand = op(*(t.detach().to(dtype) for t in (x, weight, bias)))
    assert out.dtype == dtype
    torch.testing.assert_close(out, by_hand, rtol=0, atol=0)
    torch.testing.assert_close(mixed, by_hand, rtol=0, atol=0)
    out.float().square().sum().backward()
    assert all(t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all() for t in (x, weight, bias))


def test_float64_is_left_alone_as_autocast_leaves_it():
    x, weight, bias = (t.detach().double() for t in _operands("linear"))
    with torch.autocast(DEVICE, dtype=torch.bfloat16), pytest.raises(TypeError, match="float64"):
        dropout_linear(x, weight, bias, p=P, block=BLOCK)


class MLP(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op, self.fc1, self.fc2 = op, nn.Linear(32, 64), nn.Linear(64, 16)

    def forward(self, x):
        hidden = self.fc1(x).relu()
        if self.op is None:
            return self.fc2(F.dropout(hidden, P))
        return self.op(hidden, self.fc2.weight, self.fc2.bias)


def _scaled_steps(model, steps, poison_step=None):
    """float16 autocast steps under GradScaler; poison_step's loss is made infinite."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0**12)
    x, target = torch.randn(48, 32), torch.randn(48, 16)
    scales = []
    for step in range(steps):
        optimizer.zero_grad()
        with torch.autocast(DEVICE, dtype=torch.float16):
            loss = F.mse_loss(model(x).float(), target)
        if step == poison_step:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scales.append(scaler.get_scale())
    return scales


@pytest.mark.parametrize("policy", ["block", "slice"])
def test_grad_scaler_with_float16(policy):
    """GradScaler unscales the op's gradients (the step equals plain SGD on the unscaled
    gradients) and skips a step whose gradients are infinite."""
    torch.manual_seed(0)
    model = MLP(LINEAR[policy])
    start = [t.detach().clone() for t in model.parameters()]
    torch.manual_seed(1)
    scales = _scaled_steps(model, steps=1)
    assert scales == [2.0**12]

    torch.manual_seed(0)
    plain = MLP(LINEAR[policy])
    torch.manual_seed(1)
    x, target = torch.randn(48, 32), torch.randn(48, 16)
    with torch.autocast(DEVICE, dtype=torch.float16):
        loss = F.mse_loss(plain(x).float(), target)
    loss.backward()
    for before, after, reference in zip(start, model.parameters(), plain.parameters(), strict=True):
        expected = before - 0.1 * reference.grad
        torch.testing.assert_close(after.detach(), expected, rtol=1e-3, atol=1e-4)

    frozen = [t.detach().clone() for t in model.parameters()]
    assert _scaled_steps(model, steps=1, poison_step=0) == [2.0**11]  # halved, step skipped
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.parameters(), strict=True))


def test_compiled_step_with_float16_autocast_and_grad_scaler():
    counters["slicecompile"].clear()
    torch.manual_seed(0)
    model = MLP(None)
    compiled = torch.compile(model, backend=slicecompile_backend, options={"block": BLOCK, "min_gemm_size": 0})
    scales = _scaled_steps(compiled, steps=3)
    assert scales == [2.0**12] * 3
    assert all(torch.isfinite(t).all() for t in model.parameters())
    assert counters["slicecompile"]["rewritten_dropout_linear"] == 1
    assert "fallback" not in counters["slicecompile"]
