"""torch.compile(..., backend="slicecompile"): rewrite counts, outputs and gradients against
the dense reference under the same mask, modes, dynamic shapes and recompiles, options,
fallback and logging.

Inductor lowers torch.rand to its own generator, so the compiled masks differ from eager
ones drawn after the same torch.manual_seed; the comparisons set Inductor's fallback_random
(passed through options=) to draw with eager's generator. Tests of the plumbing replace
Inductor by a stub, since a CPU Inductor compile costs seconds.
"""

import copy
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import slicecompile.compiler.backend as backend
from slicecompile import SliceWindow, draw_block_mask, draw_slice_window, dropout_linear, dropout_linear_reference
from slicecompile.compiler.backend import slicecompile_backend
from slicecompile.compiler.options import parse_options
from slicecompile.ops.dropout_conv2d import draw_channel_mask

from conftest import DEVICE
from models_by_others import TorchEncoderLayer, example_input
from tolerance import assert_close

P, BLOCK = 0.5, (16, 16)
OPTIONS = {"block": BLOCK, "min_gemm_size": 0, "fallback_random": True}


def stats():
    return dict(counters["slicecompile"])


class TwoSites(nn.Module):
    """nn.Dropout → nn.Linear on a 3-D input, then F.dropout → reshape → @ a 2-D weight."""

    def __init__(self):
        super().__init__()
        self.drop, self.fc = nn.Dropout(P), nn.Linear(32, 48)
        self.w = nn.Parameter(torch.randn(48, 24) / 48**0.5)

    def forward(self, x):
        hidden = self.fc(self.drop(x)).relu()
        return F.dropout(hidden, P, training=self.training).reshape(-1, 48) @ self.w

    def reference(self, x, masks):
        """The same computation with each dropout replaced by its block mask, in graph order."""
        hidden = self.fc(_masked(x, masks[0])).relu()
        return _masked(hidden.reshape(-1, 48), masks[1]) @ self.w


def _masked(t, mask):
    if isinstance(mask, SliceWindow):
        return t * mask.features(t.device).to(t.dtype)
    rows = t.reshape(-1, t.shape[-1])
    return (rows * mask.elements().to(t.dtype) * mask.scale).reshape(t.shape)


def _masks(seed, x):
    """The masks the compiled graph draws after torch.manual_seed(seed), in its order."""
    torch.manual_seed(seed)
    rows = x.numel() // 32
    return [draw_block_mask(rows, 32, P, BLOCK), draw_block_mask(rows, 48, P, BLOCK)]


def _windows(seed, x):
    """The slice windows the compiled graph draws after torch.manual_seed(seed), in its order."""
    torch.manual_seed(seed)
    return [draw_slice_window(32, P), draw_slice_window(48, P)]


def _check_step(compiled, model, x, seed, backward=True, draw=_masks):
    """One compiled step against the float64 and float32 references under the same masks."""
    params = [p for p in model.parameters()]
    x = x.detach().requires_grad_(backward)
    torch.manual_seed(seed)
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *params]) if backward else []
    masks = draw(seed, x)
    refs = {}
    for dtype in (torch.float64, torch.float32):
        ref_model, ref_x = copy.deepcopy(model).to(dtype), x.detach().to(dtype).requires_grad_(backward)
        ref = ref_model.reference(ref_x, masks)
        ref_grads = torch.autograd.grad(ref.square().sum(), [ref_x, *ref_model.parameters()]) if backward else []
        refs[dtype] = [ref, *ref_grads]
    for i, actual in enumerate([out, *grads]):
        assert_close(actual, refs[torch.float64][i], refs[torch.float32][i], ["y", "dx", "dW1", "db1", "dW2"][i])


def test_training_step_matches_reference():
    torch.manual_seed(0)
    model = TwoSites()
    compiled = torch.compile(model, backend=slicecompile_backend, options=OPTIONS, fullgraph=True)
    _check_step(compiled, model, torch.randn(2, 24, 32), seed=1)
    _check_step(compiled, model, torch.randn(2, 24, 32), seed=2)
    assert stats() == {
        "graphs": 1,
        "sites": 2,
        "rewritten": 2,
        "rewritten_dropout_linear": 1,
        "rewritten_dropout_matmul": 1,
    }


def test_slice_policy_training_step_matches_reference():
    torch.manual_seed(0)
    model = TwoSites()
    options = {**OPTIONS, "policy": "slice"}
    compiled = torch.compile(model, backend=slicecompile_backend, options=options, fullgraph=True)
    for seed, batch in enumerate((2, 3)):
        _check_step(compiled, model, torch.randn(batch, 24, 32), seed=seed, draw=_windows)
    assert stats()["rewritten"] >= 2 and "fallback" not in stats(), stats()


@pytest.mark.gpu
def test_slice_policy_under_cuda_graphs_draws_fresh_windows():
    """CUDA graphs (mode="reduce-overhead", which with options= is the Inductor option
    triton.cudagraphs): the slice ops stay outside the graphs, so each step still draws its own
    window; the block policy's masks are drawn on the device and may be graphed."""
    torch.manual_seed(0)
    model = TwoSites().cuda()
    for policy in ("slice", "block"):
        torch._dynamo.reset()
        options = {"block": BLOCK, "min_gemm_size": 0, "policy": policy, "triton.cudagraphs": True}
        compiled = torch.compile(model, backend="slicecompile", options=options)
        x = torch.randn(2, 24, 32, device="cuda")
        with torch.no_grad():
            outputs = [compiled(x).clone() for _ in range(5)]
        assert all(torch.isfinite(out).all() for out in outputs)
        assert len({out.sum().item() for out in outputs[2:]}) == 3, f"{policy}: the same mask replayed"


class WideBlock(nn.Module):
    """A Wide ResNet block: conv → BN → ReLU → dropout → conv, plus the shortcut."""

    def __init__(self, channels=24):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.drop = nn.Dropout(P)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(self.drop(torch.relu(self.bn(self.conv1(x)))))

    def reference(self, x, mask):
        hidden = torch.relu(self.bn(self.conv1(x)))
        return x + self.conv2(hidden * mask.factors().to(hidden)[:, :, None, None])


@pytest.mark.parametrize("policy, group", [("block", 8), ("block", 4), ("slice", 8)])
def test_dropout_conv2d_training_step_matches_reference(policy, group):
    """6 samples (one group of 6, or groups of 4 and 2) and 24 channels (blocks of 16): ragged."""
    torch.manual_seed(0)
    model = WideBlock()
    options = {**OPTIONS, "policy": policy, "samples_per_group": group}
    compiled = torch.compile(model, backend=slicecompile_backend, options=options, fullgraph=True)
    x = torch.randn(6, 24, 5, 5, requires_grad=True)
    reference_model = copy.deepcopy(model)  # its own BatchNorm running statistics
    torch.manual_seed(1)
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *model.parameters()])
    torch.manual_seed(1)
    mask = draw_channel_mask(6, 24, P, policy, samples_per_group=group, device=x.device)
    refs = {}
    for dtype in (torch.float64, torch.float32):
        ref_model, ref_x = copy.deepcopy(reference_model).to(dtype), x.detach().to(dtype).requires_grad_()
        ref = ref_model.reference(ref_x, mask)
        refs[dtype] = [ref, *torch.autograd.grad(ref.square().sum(), [ref_x, *ref_model.parameters()])]
    for i, actual in enumerate([out, *grads]):
        assert_close(actual, refs[torch.float64][i], refs[torch.float32][i], f"output {i}")
    assert stats()["rewritten_dropout_conv2d"] == 1 and "fallback" not in stats(), stats()


def test_dynamic_shapes_compile_once():
    torch.manual_seed(0)
    model = TwoSites()
    compiled = torch.compile(model, backend=slicecompile_backend, options=OPTIONS, fullgraph=True, dynamic=True)
    for seed, batch in enumerate((2, 3, 5)):
        _check_step(compiled, model, torch.randn(batch, 24, 32), seed=seed)
    assert stats()["graphs"] == 1 and stats()["rewritten"] == 2, stats()


def test_changing_batch_under_no_grad_recompiles_once():
    """Automatic dynamic shapes: the second size recompiles with a dynamic batch, the third reuses it."""
    torch.manual_seed(0)
    model = TwoSites()
    compiled = torch.compile(model, backend=slicecompile_backend, options=OPTIONS)
    with torch.no_grad():
        for seed, batch in enumerate((2, 3, 4)):
            _check_step(compiled, model, torch.randn(batch, 24, 32), seed=seed, backward=False)
    assert stats()["graphs"] == 2 and stats()["rewritten"] == 4


def test_train_eval_toggle_and_inference_mode():
    torch.manual_seed(0)
    model = TwoSites()
    compiled = torch.compile(model, backend=slicecompile_backend, options=OPTIONS, fullgraph=True)
    x = torch.randn(2, 24, 32)
    with torch.no_grad():
        _check_step(compiled, model, x, seed=1, backward=False)
        model.eval()
        torch.testing.assert_close(compiled(x), model(x))
        assert stats()["rewritten"] == 2 and stats()["skipped"] == 2  # eval: both sites left alone
        model.train()
        _check_step(compiled, model, x, seed=2, backward=False)
    assert stats()["graphs"] == 2  # train and eval, each compiled once
    with torch.inference_mode():
        _check_step(compiled, model, x, seed=3, backward=False)


class CheckpointedMLP(nn.Module):
    def __init__(self, checkpointed):
        super().__init__()
        self.checkpointed = checkpointed
        self.fc1, self.drop, self.fc2 = nn.Linear(32, 64), nn.Dropout(P), nn.Linear(64, 24)

    def layer(self, x):
        return self.fc2(self.drop(self.fc1(x).relu()))

    def forward(self, x):
        if self.checkpointed:
            return torch.utils.checkpoint.checkpoint(self.layer, x, use_reentrant=False)
        return self.layer(x)


def _step_between_reseeds(model, x):
    """Gradients of one step whose generators are reseeded between forward and backward: a
    recomputation that drew its mask afresh would draw another one."""
    torch.manual_seed(1)
    out = model(x)
    torch.manual_seed(2)
    out.square().sum().backward()
    return [t.grad.clone() for t in (x, *model.parameters())]


@pytest.mark.parametrize("policy", ["block", "slice"])
def test_checkpointed_site_is_rewritten_and_recomputed_under_the_forward_mask(policy):
    grads = []
    for checkpointed in (False, True):
        torch._dynamo.reset()
        counters["slicecompile"].clear()
        torch.manual_seed(0)
        model, x = CheckpointedMLP(checkpointed), torch.randn(40, 32, requires_grad=True)
        options = {**OPTIONS, "policy": policy}
        compiled = torch.compile(model, backend=slicecompile_backend, options=options, fullgraph=True)
        grads.append(_step_between_reseeds(compiled, x))
        assert stats() == {"graphs": 1, "sites": 1, "rewritten": 1, "rewritten_dropout_linear": 1}
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(checkpointed, plain)


def test_a_redrawn_mask_would_change_the_gradients():
    """The control for the test above: eager checkpointing told not to restore the generators
    recomputes under a new mask, and the gradients differ."""
    torch.manual_seed(0)
    fc = nn.Linear(64, 24)
    x = torch.randn(40, 64, requires_grad=True)
    step = lambda t: dropout_linear(t, fc.weight, fc.bias, p=P, block=BLOCK)  # noqa: E731
    grads = []
    for preserve in (True, False):
        x.grad = fc.weight.grad = None
        torch.manual_seed(1)
        out = torch.utils.checkpoint.checkpoint(step, x, use_reentrant=False, preserve_rng_state=preserve)
        torch.manual_seed(2)
        out.square().sum().backward()
        grads.append(fc.weight.grad.clone())
    assert not torch.allclose(*grads)


def test_autocast_computes_in_the_autocast_dtype():
    """Under autocast the rewritten linear casts its operands to bfloat16, as F.linear would."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(P), nn.Linear(32, 48))
    wrapper = torch.compile(lambda x: model(x), backend=slicecompile_backend, options=OPTIONS, fullgraph=True)
    x = torch.randn(40, 32, requires_grad=True)
    torch.manual_seed(1)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = wrapper(x)
    out.float().sum().backward()
    torch.manual_seed(1)
    mask = draw_block_mask(40, 32, P, BLOCK)
    fc = model[1]
    bf16 = [t.detach().to(torch.bfloat16) for t in (x, fc.weight, fc.bias)]
    expected = dropout_linear_reference(*[t.double() for t in bf16], mask)
    assert_close(out, expected, dropout_linear_reference(*bf16, mask), "y")
    assert x.grad.dtype == torch.float32 and fc.weight.grad.dtype == torch.float32
    assert stats()["rewritten_dropout_linear"] == 1


def test_torch_encoder_layer_trains():
    """torch.nn.TransformerEncoderLayer: its FFN dropout and its attention (SDPA inside
    nn.MultiheadAttention) are rewritten, the residual dropouts are not, and a compiled training
    step gives every parameter a finite gradient."""
    torch.manual_seed(0)
    model = TorchEncoderLayer()
    compiled = torch.compile(model, backend=slicecompile_backend, options=OPTIONS, fullgraph=True)
    compiled(example_input()).square().mean().backward()
    assert stats()["rewritten"] == 2 and stats()["rewritten_sdpa_dropout"] == 1 and stats()["skipped"] == 2
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ---- plumbing, with Inductor replaced by a stub -------------------------------------------


class StubInductor:
    """Records what the backend hands to Inductor and runs the graph eagerly."""

    def __init__(self, fail_on_rewritten=False):
        self.calls, self.fail_on_rewritten = [], fail_on_rewritten

    def __call__(self, gm, example_inputs, mode, inductor_options):
        rewritten = "linear_under_mask" in gm.code
        self.calls.append({"mode": mode, "options": inductor_options, "rewritten": rewritten})
        if rewritten and self.fail_on_rewritten:
            raise RuntimeError("simulated Inductor failure")
        return gm.forward


@pytest.fixture
def inductor(monkeypatch):
    stub = StubInductor()
    monkeypatch.setattr(backend, "_inductor", stub)
    return stub


def _run(backend_fn=slicecompile_backend, **compile_kwargs):
    torch.manual_seed(0)
    model = TwoSites()
    return torch.compile(model, backend=backend_fn, **compile_kwargs)(torch.randn(2, 24, 32))


def test_string_backend_from_entry_point(inductor):
    """Needs the torch_dynamo_backends entry point in pyproject.toml (no import of ours)."""
    _run("slicecompile", options={"min_gemm_size": 0})
    assert stats()["rewritten"] == 2 and inductor.calls[0]["rewritten"]


def test_mode_and_inductor_options_pass_through(monkeypatch):
    seen = []

    class Wrapper:
        def __init__(self, mode, options, dynamic):
            options = dict(options)
            assert isinstance(options.pop("post_grad_custom_post_pass"), backend.SourcesKey)
            seen.append((mode, options))

        def __call__(self, gm, example_inputs):
            return gm.forward

    monkeypatch.setattr(torch, "_TorchCompileInductorWrapper", Wrapper)
    _run(mode="max-autotune-no-cudagraphs")
    _run(options={"min_gemm_size": 0, "epilogue_fusion": False, "block": 32})
    assert seen == [("max-autotune-no-cudagraphs", {}), (None, {"epilogue_fusion": False})]
    assert stats()["rewritten"] == 2  # only the second run's graph passes the size threshold


def test_default_size_threshold_skips_small_gemms(inductor):
    _run()
    assert stats() == {"graphs": 1, "sites": 2, "skipped": 2} and not inductor.calls[0]["rewritten"]


def test_unknown_option_lists_the_known_ones():
    with pytest.raises(
        ValueError,
        match="unknown slicecompile option 'blokc'.*block, policy, input_side, output_side, min_gemm_size, enabled, "
        "samples_per_group",
    ):
        parse_options({"blokc": 64})
    with pytest.raises(Exception, match="unknown slicecompile option"):
        _run(options={"blokc": 64})


@pytest.mark.parametrize(
    "options, error",
    [
        ({"block": (24, 32)}, "powers of two"),
        ({"policy": "columns"}, "unknown policy 'columns'; known policies: block, slice"),
        ({"min_gemm_size": -1}, "min_gemm_size must be an int >= 0"),
        ({"enabled": "yes"}, "enabled must be a bool"),
        ({"output_side": 0}, "output_side must be a bool"),
        ({"input_side": None}, "input_side must be a bool"),
        ({"samples_per_group": 0}, "samples_per_group must be a positive int"),
        ({"attention": "dropconnect"}, "unknown attention policy 'dropconnect'.*known policies: dropout, dropkey"),
    ],
)
def test_bad_option_values(options, error):
    with pytest.raises((ValueError, TypeError), match=error):
        parse_options(options)


def test_block_option_is_used(inductor):
    settings, _ = parse_options({"block": 64, "min_gemm_size": 0})
    assert settings.block == (64, 64) and settings.policy == "block"


def test_env_var_disables(inductor, monkeypatch):
    monkeypatch.setenv("SLICECOMPILE_DISABLE", "1")
    _run(options={"min_gemm_size": 0})
    assert stats() == {"disabled": 1} and not inductor.calls[0]["rewritten"]


def test_enabled_false_disables(inductor):
    _run(options={"min_gemm_size": 0, "enabled": False})
    assert stats() == {"disabled": 1} and not inductor.calls[0]["rewritten"]


def test_failed_rewrite_compiles_the_original(inductor, monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("simulated rewrite bug")

    monkeypatch.setattr(backend, "rewrite", broken)
    out = _run(options={"min_gemm_size": 0})
    assert out.shape == (48, 24) and stats() == {"graphs": 1, "fallback": 1}
    assert [call["rewritten"] for call in inductor.calls] == [False]
    assert "the rewrite failed" in caplog.text


def test_failed_compile_of_rewritten_graph_compiles_the_original(monkeypatch, caplog):
    stub = StubInductor(fail_on_rewritten=True)
    monkeypatch.setattr(backend, "_inductor", stub)
    _run(options={"min_gemm_size": 0})
    assert [call["rewritten"] for call in stub.calls] == [True, False]
    assert stats()["fallback"] == 1 and "rewritten" not in stats() and stats()["skipped"] == 2
    assert "compiling the rewritten graph failed" in caplog.text


def test_logger_reports_each_site(inductor, caplog):
    caplog.set_level(logging.DEBUG, logger="slicecompile")
    _run(options={"min_gemm_size": 60_000})  # 48·32·48 = 73,728 passes, 48·48·24 = 55,296 not
    messages = [record.getMessage() for record in caplog.records if record.name == "slicecompile"]
    assert len(messages) == 2
    assert "rewrote (dropout_linear)" in messages[0] and "drop" in messages[0]
    assert "skipped: GEMM too small (M*K*N = 55296 < min_gemm_size = 60000)" in messages[1]
    assert stats()["rewritten"] == 1 and stats()["skipped"] == 1
