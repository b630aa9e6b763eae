"""The output side of the FX pass and backend: a matmul whose output reaches a dropout becomes
block dropout of the matmul's output (linear_dropout). Positive cases come as quartets (module,
expected rewrite, output and gradients against the dense reference under the same mask,
graph.lint()); negative cases must leave the graph untouched, with their reason."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

from slicecompile.compiler.backend import slicecompile_backend
from slicecompile.compiler.graphs import graph_modules
from slicecompile.compiler.options import Options
from slicecompile.compiler.patterns import is_dropout
from slicecompile.compiler.rewrite import rewrite
from slicecompile.compiler.sites import find_sites

from test_sites import ALWAYS, BLOCK, P, block_masked, dynamo_graph
from tolerance import assert_close


class Residual(nn.Module):
    """nanoGPT's attention output: x + dropout(c_proj(x))."""

    pattern, shape = "linear_dropout", (2, 24, 32)

    def __init__(self):
        super().__init__()
        self.c_proj, self.drop = nn.Linear(32, 32), nn.Dropout(P)

    def forward(self, x):
        return x + self.drop(self.c_proj(x))

    def reference(self, x, masked):
        return x + masked(self.c_proj(x))


class MatmulByTransposed(Residual):
    pattern = "matmul_dropout"

    def __init__(self):
        super().__init__()
        self.c_proj = nn.Linear(32, 32, bias=False)

    def forward(self, x):
        return x + F.dropout(x @ self.c_proj.weight.t(), P)

    def reference(self, x, masked):
        return x + masked(x @ self.c_proj.weight.t())


class Conv1DStyle(Residual):
    """Hugging Face GPT-2's Conv1D: addmm on the flattened input, a view back, then dropout."""

    pattern = "addmm_dropout"

    def forward(self, x):
        y = torch.addmm(self.c_proj.bias, x.view(-1, 32), self.c_proj.weight.t())
        return x + self.drop(y.view(2, 24, 32))

    def reference(self, x, masked):
        return x + masked(self.c_proj(x))


class ScaledBeforeDropout(Residual):
    def forward(self, x):
        return self.drop(self.c_proj(x) * 0.5)

    def reference(self, x, masked):
        return masked(self.c_proj(x) * 0.5)


class WideProjection(Residual):
    """Ragged on both axes of the mask: 40 rows, 40 output features, in blocks of 16."""

    shape = (5, 8, 24)

    def __init__(self):
        super().__init__()
        self.c_proj = nn.Linear(24, 40, bias=False)

    def forward(self, x):
        return self.drop(self.c_proj(x)).relu()

    def reference(self, x, masked):
        return masked(self.c_proj(x)).relu()


class Checkpointed(Residual):
    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(super().forward, x, use_reentrant=False)


class LinearDropoutLinear(nn.Module):
    """fc1 → dropout → fc2 fits both sides: the input side is tried first."""

    shape = (2, 24, 32)

    def __init__(self):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(32, 48), nn.Dropout(P), nn.Linear(48, 16)

    def forward(self, x):
        return self.fc2(self.drop(self.fc1(x)))

    def reference(self, x, masked):
        return self.fc2(masked(self.fc1(x)))


POSITIVE = [Residual, MatmulByTransposed, Conv1DStyle, ScaledBeforeDropout, WideProjection, Checkpointed]


def _check(model, x, options, expected):
    """The quartet: expected (pattern, side) rewritten; output and gradients against the fp64
    and fp32 references under the mask the rewritten graph draws; every graph lints."""
    x = x.requires_grad_()
    gm, inputs = dynamo_graph(model, x)
    sites = find_sites(gm, options)
    assert [(site.pattern, site.side, site.reason) for site in sites] == [(*expected, "rewritten")]
    assert rewrite(gm, sites, BLOCK) == 1
    for sub, _ in graph_modules(gm):
        sub.graph.lint()
        assert not any(is_dropout(node) for node in sub.graph.nodes)

    params = list(model.parameters())
    torch.manual_seed(1)
    (out,) = gm(*inputs)
    grads = torch.autograd.grad(out.square().sum(), [x, *params])
    refs = {}
    for dtype in (torch.float64, torch.float32):
        ref_model, ref_x = copy.deepcopy(model).to(dtype), x.detach().to(dtype).requires_grad_()
        ref = ref_model.reference(ref_x, block_masked(seed=1))
        refs[dtype] = [ref, *torch.autograd.grad(ref.square().sum(), [ref_x, *ref_model.parameters()])]
    for i, actual in enumerate([out, *grads]):
        assert_close(actual, refs[torch.float64][i], refs[torch.float32][i], f"output/grad {i}")


@pytest.mark.parametrize("case", POSITIVE, ids=lambda case: case.__name__)
def test_rewrites_and_matches_reference(case):
    torch.manual_seed(0)
    _check(case(), torch.randn(case.shape), ALWAYS, (case.pattern, "output"))


def test_a_site_on_both_sides_takes_the_input_side_unless_it_is_off():
    torch.manual_seed(0)
    model, x = LinearDropoutLinear(), torch.randn(LinearDropoutLinear.shape)
    _check(model, x, ALWAYS, ("dropout_linear", "input"))
    _check(model, x, Options(block=BLOCK, min_gemm_size=0, input_side=False), ("linear_dropout", "output"))


class GeluBetween(Residual):
    def forward(self, x):
        return x + self.drop(F.gelu(self.c_proj(x)))


class ReadElsewhere(Residual):
    def forward(self, x):
        y = self.c_proj(x)
        return y + self.drop(y)


class SliceBetween(Residual):
    def forward(self, x):
        return self.drop((x @ self.c_proj.weight.t())[..., :16])


class AfterBatchedMatmul(Residual):
    def forward(self, x):
        return self.drop(x @ x.transpose(1, 2))


class AfterConv(Residual):
    def forward(self, x):
        return self.drop(F.conv2d(x[None], torch.ones(4, 2, 3, 3)))


def _eval(case):
    return lambda: case().eval()


NEGATIVE = {
    "gelu_between": (GeluBetween, ALWAYS, "gelu between linear and the dropout (not fused)"),
    "read_elsewhere": (ReadElsewhere, ALWAYS, "the linear before the dropout is read elsewhere too"),
    "slice_between": (SliceBetween, ALWAYS, "getitem between matmul and the dropout (not fused)"),
    "batched": (AfterBatchedMatmul, ALWAYS, "batched matmul before the dropout (the output side covers linear layers)"),
    "conv": (AfterConv, ALWAYS, "conv2d before the dropout (the output side covers linear layers)"),
    "eval": (_eval(Residual), ALWAYS, "eval mode (training=False)"),
    "output_side_off": (
        Residual,
        Options(output_side=False, min_gemm_size=0),
        "output side turned off (output_side=False)",
    ),
    "small_gemm": (
        Residual,
        Options(),
        "GEMM too small: 0.015 µs forward+backward at an H100's peaks (bytes-bound) < 1 µs",
    ),
    "float64": (lambda: Residual().double(), ALWAYS, "unsupported dtype torch.float64"),
    "disabled": (Residual, Options(enabled=False, min_gemm_size=0), "disabled by options"),
}


@pytest.mark.parametrize("name", NEGATIVE)
def test_leaves_graph_alone(name):
    make, options, reason = NEGATIVE[name]
    model = make()
    gm, _ = dynamo_graph(model, torch.randn(Residual.shape, dtype=model.c_proj.weight.dtype))
    before = gm.code
    sites = find_sites(gm, options)
    assert [(site.rewritten, site.reason) for site in sites] == [(False, reason)]
    assert rewrite(gm, sites, BLOCK) == 0
    assert gm.code == before


class Mlp(nn.Module):
    """GPT-2's MLP with its residual: x + dropout(c_proj(gelu(c_fc(x))))."""

    def __init__(self):
        super().__init__()
        self.c_fc, self.c_proj, self.drop = nn.Linear(32, 64), nn.Linear(64, 32), nn.Dropout(P)

    def forward(self, x):
        return x + self.drop(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))

    def reference(self, x, masked):
        return x + masked(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_training_step_matches_reference(dynamic):
    """Through Inductor (drawing with eager's generator), two steps with their own masks; with
    dynamic shapes, two batch sizes (ragged in the mask's rows) and one compile."""
    counters["slicecompile"].clear()
    torch.manual_seed(0)
    model = Mlp()
    options = {"block": BLOCK, "min_gemm_size": 0, "fallback_random": True}
    compiled = torch.compile(model, backend=slicecompile_backend, options=options, fullgraph=True, dynamic=dynamic)
    for seed, batch in ((1, 3), (2, 5 if dynamic else 3)):
        x = torch.randn(batch, 15, 32, requires_grad=True)
        torch.manual_seed(seed)
        out = compiled(x)
        grads = torch.autograd.grad(out.square().sum(), [x, *model.parameters()])
        refs = {}
        for dtype in (torch.float64, torch.float32):
            ref_model, ref_x = copy.deepcopy(model).to(dtype), x.detach().to(dtype).requires_grad_()
            ref = ref_model.reference(ref_x, block_masked(seed))
            refs[dtype] = [ref, *torch.autograd.grad(ref.square().sum(), [ref_x, *ref_model.parameters()])]
        for i, actual in enumerate([out, *grads]):
            assert_close(actual, refs[torch.float64][i], refs[torch.float32][i], f"step {seed}, output/grad {i}")
    assert dict(counters["slicecompile"]) == {
        "graphs": 1,
        "sites": 1,
        "rewritten": 1,
        "rewritten_linear_dropout": 1,
    }
