"""LoRA adapters: PEFT's `lora_B(lora_A(dropout(x))) * scaling` on a small Llama made from a config
(no downloads), and a torchtune-style LoRALinear. Every lora_dropout is a dropout → linear site:
explain() lists each as rewritten under the name named_modules() gives it; a compiled training step
equals the same model run eagerly with each lora_dropout replaced by the block mask the compiled
graph drew (single and multiple adapters, rsLoRA, modules_to_save, bf16 autocast, gradient
checkpointing), and only the adapters (and modules_to_save) get gradients. With lora_dropout = 0,
in eval mode and with merged adapters nothing is rewritten and the graph is the original one.

Inductor's CPU code generation for a Llama training step takes 25-50 s, too long for the suite, so
the backend hands its (rewritten) graphs to a stand-in for Inductor: Dynamo's graph run as it is,
the ops computing their CPU path, the dense reference, as Inductor's CPU code does (not the
kernels through Triton's interpreter); and a graph with a checkpointed region through AOTAutograd
(aot_eager), whose recomputation must replay the forward's masks, as under Inductor.
test_backend.py and test_hf_models.py compile rewritten graphs with Inductor itself.

Block 16 and min_gemm_size 0 let the tiny GEMMs through; 20 tokens a sequence make ragged
block-rows; p = 0.25 over 4 tiles a row drops one tile in every block-row.
"""

import copy
from typing import NamedTuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import slicecompile.compiler.backend as backend
from slicecompile import draw_block_mask
from slicecompile.compiler.explain import explain
from slicecompile.ops.masks import flattened_rows

from test_backend import _masked
from tolerance import assert_close

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

P, BLOCK = 0.25, (16, 16)
OPTIONS = {"block": BLOCK, "min_gemm_size": 0}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA = dict(
    vocab_size=100,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
)


@pytest.fixture(autouse=True)
def graphs(monkeypatch):
    """The graphs the backend hands to Inductor's stand-in (the module's docstring)."""
    seen = []

    def stand_in(gm, example_inputs, mode, inductor_options):
        seen.append(gm)
        if _checkpointed(gm):
            return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
        return gm.forward

    monkeypatch.setattr(backend, "_inductor", stand_in)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    return seen


def _checkpointed(gm):
    return any(node.target is torch.ops.higher_order.tag_activation_checkpoint for node in gm.graph.nodes)


def _tokens():
    torch.manual_seed(0)
    return {"input_ids": torch.randint(0, LLAMA["vocab_size"], (2, 20)), "use_cache": False}


def peft_llama(lora_dropout=P, **lora):
    """A one-layer Llama with LoRA on all seven projections. init_lora_weights=False draws lora_B
    at random too (PEFT's default zeros would make every lora_A gradient zero)."""
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    config = peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=lora_dropout, target_modules=TARGETS, init_lora_weights=False, **lora
    )
    return peft.get_peft_model(base, config).train()


def two_adapters():
    """Two adapters active at once, the second with rsLoRA's scaling (alpha / sqrt(r)): every
    projection reads x through two dropouts, each with its own mask."""
    model = peft_llama()
    config = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=P, target_modules=TARGETS, init_lora_weights=False, use_rslora=True
    )
    model.add_adapter("second", config)
    model.base_model.set_adapter(["default", "second"])
    return model


class BlockMaskedDropout(nn.Module):
    """Dropout under the block mask the rewritten graph draws in this dropout's place: the graphs
    draw one mask per site from torch's generator, in the order the model calls its dropouts."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        return _masked(x, draw_block_mask(flattened_rows(x), x.shape[-1], self.p, BLOCK, device=x.device))


def block_masked(model, dtype):
    """A copy of model in dtype whose dropouts drop what the compiled model's sites drop."""
    model = copy.deepcopy(model).to(dtype)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.Dropout) and child.p > 0:
                setattr(parent, name, BlockMaskedDropout(child.p))
    return model


def _loss(model, inputs):
    """Next-token cross-entropy in the logits' dtype (HF's own loss computes in float32, which
    would make the float64 reference no better than float32)."""
    logits = model(**inputs).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), inputs["input_ids"][:, 1:].flatten())


def _step(model, inputs, seed, reseed=False, autocast=None):
    """The loss and the trainable parameters' gradients of one step after torch.manual_seed(seed);
    reseed: other generator states for the backward, which must reuse the forward's masks."""
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        loss = _loss(model, inputs)
    if reseed:
        torch.manual_seed(seed + 1)
    return [loss, *torch.autograd.grad(loss, params)]


def check_training_step(model, inputs, rewritten, reseed=False, autocast=None):
    """A compiled step against the float64 and float32 (autocast's, if any) block-masked copies;
    rewritten: how many sites the compile must rewrite."""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    compiled = torch.compile(model, backend="slicecompile", options=OPTIONS)
    actual = _step(compiled, inputs, seed=1, reseed=reseed, autocast=autocast)
    assert counters["slicecompile"]["rewritten_dropout_linear"] == rewritten, dict(counters["slicecompile"])
    assert "fallback" not in counters["slicecompile"]
    expected64 = _step(block_masked(model, torch.float64), inputs, seed=1)
    eager = _step(block_masked(model, torch.float32), inputs, seed=1, autocast=autocast)
    names = ["loss"] + [name for name, p in model.named_parameters() if p.requires_grad]
    for name, a, e64, e in zip(names, actual, expected64, eager, strict=True):
        assert_close(a, e64, e, name)
    # a frozen base: backward reaches the adapters (and modules_to_save) only
    _loss(compiled, inputs).backward()
    assert all((p.grad is None) == (name in frozen) for name, p in model.named_parameters())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def lora_sites(report):
    return [site for site in report.sites if ".lora_dropout." in site.module]


def test_explain_names_each_lora_dropout_as_named_modules_does():
    model = peft_llama(lora_dropout=0.1)
    report = explain(model, **_tokens(), options=OPTIONS)
    modules = dict(model.named_modules())
    sites = lora_sites(report)
    assert [site.module for site in sites] == [
        f"base_model.model.model.layers.0.{block}.{target}.lora_dropout.default"
        for block, target in zip(["self_attn"] * 4 + ["mlp"] * 3, TARGETS)
    ]
    assert all(isinstance(modules[site.module], nn.Dropout) for site in sites)
    assert all((site.rewritten, site.pattern, site.p) == (True, "dropout_linear", 0.1) for site in sites)
    assert all(site.gemms == ((40, site.input_shape[-1], 8),) for site in sites)
    # the only other site: attention, whose dropout_p is 0 in Llama's config
    (attention,) = [site for site in report.sites if site not in sites]
    assert (attention.module, attention.rewritten) == ("base_model.model.model.layers.0.self_attn", False)


def test_one_adapter_with_modules_to_save():
    """lm_head trains as a full copy beside the adapters; the base stays frozen."""
    check_training_step(peft_llama(modules_to_save=["lm_head"]), _tokens(), 7)


def test_two_adapters_with_rslora_under_bf16_autocast():
    check_training_step(two_adapters(), _tokens(), 14, autocast=torch.bfloat16)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True)
def test_gradient_checkpointing_recomputes_under_the_forward_masks(graphs):
    """HF's checkpointed layers under torch.compile, set up as the README says: transformers'
    kernelized functions (Llama's rotary embedding) set a global in the layer's forward, a side
    effect Dynamo will not trace into a checkpointed region unless told it need not replay it in
    the recomputation (it is undone before the forward returns; without the flag the layers run
    eagerly, unrewritten); and the hook that makes the embeddings' output require grad, which only
    reentrant checkpointing needs, breaks the graph in two."""
    model = peft_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.get_base_model().disable_input_require_grads()
    check_training_step(model, _tokens(), 7, reseed=True)
    assert len(graphs) == 1 and _checkpointed(graphs[0])


def _no_lora_dropout():
    return peft_llama(lora_dropout=0.0)


def _eval():
    return peft_llama().eval()


def _merged():
    model = peft_llama()
    model.merge_adapter()
    return model


@pytest.mark.parametrize("make", [_no_lora_dropout, _eval, _merged], ids=["lora_dropout_0", "eval", "merged"])
def test_nothing_to_drop_compiles_the_original_graph(make, graphs):
    """PEFT's lora_dropout = 0 is an nn.Identity, eval mode's dropouts are identities, and merged
    adapters skip theirs: no site is rewritten, the original graph is compiled, and a step gives
    the eager loss and gradients exactly (merged: none reach the adapters)."""
    model, inputs = make(), _tokens()
    params = [p for p in model.parameters() if p.requires_grad]
    compiled = torch.compile(model, backend="slicecompile", options=OPTIONS)
    for actual, expected in zip(*(_plain_step(m, inputs, params) for m in (compiled, model)), strict=True):
        assert (actual is None and expected is None) or torch.equal(actual, expected)
    assert "rewritten" not in counters["slicecompile"] and all("under_mask" not in gm.code for gm in graphs)
    # the attention site (dropout_p = 0), and in eval mode the seven lora_dropouts too
    assert counters["slicecompile"]["sites"] == (8 if make is _eval else 1), dict(counters["slicecompile"])


def _plain_step(model, inputs, params):
    loss = _loss(model, inputs)
    if not loss.requires_grad:  # merged adapters: the step reads frozen weights only
        return [loss] + [None] * len(params)
    return [loss, *torch.autograd.grad(loss, params, allow_unused=True)]


class LoRALinear(nn.Module):
    """torchtune's LoRALinear: a frozen linear layer plus lora_b(lora_a(dropout(x))) * alpha / rank."""

    def __init__(self, in_dim, out_dim, rank=8, alpha=16, dropout=P):
        super().__init__()
        base = nn.Linear(in_dim, out_dim)
        self.weight = nn.Parameter(base.weight.detach(), requires_grad=False)
        self.bias = nn.Parameter(base.bias.detach(), requires_grad=False)
        self.dropout = nn.Dropout(dropout)
        self.lora_a, self.lora_b = nn.Linear(in_dim, rank, bias=False), nn.Linear(rank, out_dim, bias=False)
        nn.init.normal_(self.lora_b.weight, std=0.1)  # torchtune starts it at zero
        self.scaling = alpha / rank

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        return out + self.lora_b(self.lora_a(self.dropout(x))) * self.scaling


class Output(NamedTuple):
    logits: torch.Tensor


class GatedBlock(nn.Module):
    """Frozen embedding and output layers around three adapted projections: two of the same x,
    a third of their product."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(LLAMA["vocab_size"], 64).requires_grad_(False)
        self.gate, self.up, self.down = LoRALinear(64, 96), LoRALinear(64, 96), LoRALinear(96, 64)
        self.head = nn.Linear(64, LLAMA["vocab_size"]).requires_grad_(False)

    def forward(self, input_ids, use_cache):
        x = self.embed(input_ids)
        return Output(self.head(self.down(F.silu(self.gate(x)) * self.up(x))))


def test_torchtune_lora_linear():
    torch.manual_seed(0)
    model = GatedBlock()
    report = explain(model, **_tokens(), options=OPTIONS)
    assert [(site.module, site.rewritten) for site in report.sites] == [
        ("gate.dropout", True),
        ("up.dropout", True),
        ("down.dropout", True),
    ]
    check_training_step(model, _tokens(), 3)
