"""Hugging Face transformers models, built from small configs (no weights, no network): BERT
and GPT-2 with a classification head, T5 and ViT, with eager attention, and with their default SDPA
attention. explain() lists their dropout sites; a compiled training step rewrites the expected
ones and gives finite gradients; in training mode the compiled logits have the statistics of the
model run eagerly with ordinary dropout, and in eval mode they are the eager logits.

Block size 16 and min_gemm_size 0, so that these tiny GEMMs are rewritten; sequence lengths
and token counts (24, 17) are not multiples of the block: ragged tiles.
"""

import copy
import re
from collections import Counter
from statistics import NormalDist

import pytest
import torch
from torch._dynamo.utils import counters

from slicecompile.compiler.explain import explain

from tolerance import assert_close

transformers = pytest.importorskip("transformers")

P = 0.1  # transformers' default dropout probability
OPTIONS = {"block": 16, "min_gemm_size": 0}
# Forward passes per model and mode for the statistics: a few seconds in all once compiled.
PASSES = 400
# Probability that the statistics test fails on a correct rewrite, split over its tests.
FALSE_ALARM = 1e-3


def _padded_tokens():
    """Four sequences of 24 tokens, the second padded from token 18 (the padding is added to the
    scores before the softmax)."""
    input_ids = torch.randint(1, 64, (4, 24))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 18:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _bert(attention="eager"):
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=P,
        attention_probs_dropout_prob=P,
        num_labels=3,
        problem_type="single_label_classification",  # else set on the first call: a recompile
        attn_implementation=attention,
    )
    inputs = {**_padded_tokens(), "labels": torch.tensor([0, 1, 2, 0])}
    return transformers.BertForSequenceClassification(config), inputs


def _gpt2(attention="eager"):
    config = transformers.GPT2Config(
        vocab_size=64,
        n_positions=32,
        n_embd=32,
        n_layer=1,
        n_head=2,
        resid_pdrop=P,
        embd_pdrop=P,
        attn_pdrop=P,
        num_labels=3,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        problem_type="single_label_classification",
        attn_implementation=attention,
    )
    inputs = {**_padded_tokens(), "labels": torch.tensor([0, 1, 2, 0])}
    return transformers.GPT2ForSequenceClassification(config), inputs


def _t5(attention="eager"):
    config = transformers.T5Config(
        vocab_size=64,
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        feed_forward_proj="relu",
        dropout_rate=P,
        decoder_start_token_id=0,
        pad_token_id=0,
        attn_implementation=attention,
    )
    inputs = {**_padded_tokens(), "labels": torch.randint(1, 64, (4, 16))}
    return transformers.T5ForConditionalGeneration(config), inputs


def _vit(attention="eager"):
    config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,  # 16 patches and the class token: 17 tokens
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=P,
        attention_probs_dropout_prob=P,
        num_labels=3,
        problem_type="single_label_classification",
        attn_implementation=attention,
    )
    inputs = {"pixel_values": torch.randn(4, 3, 32, 32), "labels": torch.tensor([0, 1, 2, 0])}
    return transformers.ViTForImageClassification(config), inputs


RESIDUAL = "used by add (not a matmul input)"


def one_side(module):
    """An output-side site whose linear layer takes the block-dropped input of the site at
    module.dropout (reasons are compared without line numbers, which move between transformers versions)."""
    return f"the linear's input is block-dropped already by {module}.dropout (modeling_t5.py): one side per matmul"


# name: (builder, its modeling file, [(module, consumer, pattern if rewritten, reason) per site, in graph order])
MODELS = {
    "bert": (
        _bert,
        "modeling_bert.py",
        [
            # Feeds the query, key and value projections, and the residual around attention.
            ("bert.embeddings.dropout", "add", None, RESIDUAL),
            # eager_attention_forward: F.dropout(softmax(scores + mask)) → torch.matmul(·, value).
            ("bert.encoder.layer.0.attention.self", "matmul", "attention_dropout", "rewritten"),
            # dense → dropout → add + LayerNorm, after attention and after the FFN.
            ("bert.encoder.layer.0.attention.output.dropout", "linear", "linear_dropout", "rewritten"),
            ("bert.encoder.layer.0.output.dropout", "linear", "linear_dropout", "rewritten"),
            ("dropout", "linear", "dropout_linear", "rewritten"),  # the classifier head's
        ],
    ),
    "gpt2": (
        _gpt2,
        "modeling_gpt2.py",
        [
            ("transformer.drop", "layer_norm", None, "used by layer_norm (not a matmul input)"),
            # eager_attention_forward: F.dropout(softmax(scores * scaling + mask).type(v)) → matmul(·, value).
            ("transformer.h.0.attn", "matmul", "attention_dropout", "rewritten"),
            # Conv1D (addmm) → dropout → add, after attention and after the MLP.
            ("transformer.h.0.attn.resid_dropout", "addmm", "addmm_dropout", "rewritten"),
            ("transformer.h.0.mlp.dropout", "addmm", "addmm_dropout", "rewritten"),
        ],
    ),
    "t5": (
        _t5,
        "modeling_t5.py",
        [
            # Feeds T5LayerNorm (whose first op is .to(float32)) and the residual.
            ("encoder.dropout", "to", None, "used by to (not a matmul input)"),
            ("encoder.block.0.layer.0.SelfAttention", "matmul", "attention_dropout", "rewritten"),
            ("encoder.block.0.layer.0.dropout", "linear", "linear_dropout", "rewritten"),  # o → dropout → add
            ("encoder.block.0.layer.1.DenseReluDense.dropout", "linear", "dropout_linear", "rewritten"),  # → wo
            ("encoder.block.0.layer.1.dropout", "linear", None, one_side("encoder.block.0.layer.1.DenseReluDense")),
            # The encoder's output: returned (encoder_last_hidden_state) besides feeding cross-attention.
            ("encoder.dropout", "output", None, "used by output (not a matmul input)"),
            ("decoder.dropout", "to", None, "used by to (not a matmul input)"),
            ("decoder.block.0.layer.0.SelfAttention", "matmul", "attention_dropout", "rewritten"),
            ("decoder.block.0.layer.0.dropout", "linear", "linear_dropout", "rewritten"),
            ("decoder.block.0.layer.1.EncDecAttention", "matmul", "attention_dropout", "rewritten"),
            ("decoder.block.0.layer.1.dropout", "linear", "linear_dropout", "rewritten"),
            ("decoder.block.0.layer.2.DenseReluDense.dropout", "linear", "dropout_linear", "rewritten"),
            ("decoder.block.0.layer.2.dropout", "linear", None, one_side("decoder.block.0.layer.2.DenseReluDense")),
            # The decoder's output, scaled by d_model**-0.5 (tied embeddings) on its way to lm_head.
            ("decoder.dropout", "linear", "dropout_linear", "rewritten"),
        ],
    ),
    "vit": (
        _vit,
        "modeling_vit.py",
        [
            ("vit.embeddings.dropout", "layer_norm", None, "used by layer_norm (not a matmul input)"),
            ("vit.layers.0.attention", "matmul", "attention_dropout", "rewritten"),
            ("vit.layers.0.dropout", "linear", "linear_dropout", "rewritten"),  # after attention's output dense
            ("vit.layers.0.dropout", "linear", "linear_dropout", "rewritten"),  # after the MLP (no inner dropout)
        ],
    ),
}


def _build(name, attention="eager"):
    torch.manual_seed(0)
    model, inputs = MODELS[name][0](attention)
    return model.train(), inputs


def _with_sdpa(rows):
    """The table of a model whose attention runs F.scaled_dot_product_attention: each eager
    attention site becomes an SDPA call with dropout_p, in the same module."""
    sdpa = lambda module: (module, "scaled_dot_product_attention", "sdpa_dropout", "rewritten")  # noqa: E731
    return [sdpa(row[0]) if row[2] == "attention_dropout" else row for row in rows]


def _training_stats(name):
    """The counters after one training-mode compile, but the graph count (Dynamo breaks T5
    into several graphs with some torch and transformers versions): its sites, rewritten per
    pattern, skipped."""
    patterns = Counter(pattern for *_, pattern, reason in MODELS[name][2] if reason == "rewritten")
    rewritten = sum(patterns.values())
    return {
        "sites": len(MODELS[name][2]),
        "rewritten": rewritten,
        "skipped": len(MODELS[name][2]) - rewritten,
        **{f"rewritten_{pattern}": count for pattern, count in patterns.items()},
    }


def _stats():
    """The counters but the number of graphs."""
    return {key: value for key, value in counters["slicecompile"].items() if key != "graphs"}


def _explain_one_graph(model, inputs):
    """explain()'s report, or a skip where Dynamo breaks the model into several graphs (T5 with
    torch 2.11 and transformers 5.17): module paths are then relative to each graph's frame,
    and a site cut by a break cannot be rewritten. The tables are those of one graph."""
    report = explain(model, **inputs, options=OPTIONS)
    counters["slicecompile"].clear()
    if report.graphs > 1:
        versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
        pytest.skip(f"Dynamo breaks {type(model).__name__} into {report.graphs} graphs here ({versions})")
    return report


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("name", MODELS)
def test_explain_lists_the_sites(name, attention):
    model, inputs = _build(name, attention)
    _, modeling_file, expected = MODELS[name]
    report = _explain_one_graph(model, inputs)
    reason = lambda site: re.sub(r"(\.py):\d+", r"\1", site.reason)  # noqa: E731
    rows = [(s.module, s.consumer, s.pattern if s.rewritten else None, reason(s)) for s in report.sites]
    assert rows == (expected if attention == "eager" else _with_sdpa(expected))
    files = (f"{modeling_file}:", "sdpa_attention.py:")
    assert all(s.p == P and s.location.startswith(files) for s in report.sites)


def _samples(run):
    """(PASSES, logits' elements) float64 logits of PASSES calls, each with its own dropout masks."""
    return torch.stack([run().logits.detach().double().flatten() for _ in range(PASSES)])


def _summaries(samples):
    """The logits averaged over the passes, and that average's mean and std over the elements,
    each of the two with its linearisation: one value per pass, whose variance / passes is the
    summary's squared standard error (the passes are independent)."""
    passes, elements = samples.shape
    average = samples.mean(0)
    mean, mean_per_pass = average.mean(), samples.mean(1)
    # The average's variance over the elements, less the part its own sampling noise adds.
    noise = (samples.var(0).sum() - elements * mean_per_pass.var()) / ((elements - 1) * passes)
    std = (average.var() - noise).sqrt()
    std_per_pass = samples @ ((average - mean) / ((elements - 1) * std))  # d std / d average
    return average, (mean, mean_per_pass), (std, std_per_pass)


def _z(compiled, eager, compiled_per_pass, eager_per_pass):
    """Welch's z of compiled - eager, means over independent passes."""
    se = ((compiled_per_pass.var(0) + eager_per_pass.var(0)) / len(compiled_per_pass)).sqrt()
    return (compiled - eager) / se


def _assert_same_statistics(compiled, eager, dense):
    """compiled, eager: (passes, elements) logits in training mode; dense: the logits in eval
    mode. The logits averaged over dropout masks agree, element by element, and in their mean
    and std over the elements.

    Block dropout keeps each element with probability 1 - p and scales it by 1 / (1 - p), as
    ordinary dropout does, so whatever is linear in a mask keeps its expectation: the bounds
    are Welch's z against the normal quantile of a FALSE_ALARM probability (half of it split
    over the elements, Bonferroni, conservative for correlated ones; a quarter each for mean
    and std). Dropping whole tiles correlates the drops, which reaches the averages at second
    order, through the norms and nonlinearities after the sites. Element by element that is
    below the resolution of 400 passes (at 2000: largest |z| BERT 1.5, ViT 1.7, T5 4.9 of 4096
    with rms 1.19). Mean and std pool every element and resolve it (T5's std: -0.5% at z = -7.5
    at 2000 passes), so they get a margin: ordinary dropout's own second-order effect, its shift
    of the statistic from the dropout-free (eval) logits (T5's std: -10.7%). Second-order
    effects scale with the noise a mask adds, and block dropout's noise variance per logit is
    0.97 to 1.44 times ordinary dropout's here; the margin allows up to twice.

    Not compared: each logit's variance over masks, which correlated drops change by design.
    What fails: a missing 1 / (1 - p) in the rewritten ops (|z| of an element 5.8 for BERT, 7.8
    for T5). At initialisation ViT's attention branch is small next to its residual stream, so
    for ViT this checks that the rewrite leaves the rest of the model alone.
    """
    normal = NormalDist()
    (average_c, *summaries_c), (average_e, *summaries_e) = _summaries(compiled), _summaries(eager)
    z = _z(average_c, average_e, compiled, eager).abs().max().item()
    bound = normal.inv_cdf(1 - FALSE_ALARM / 4 / len(average_c))
    assert z <= bound, f"a logit's average differs: |z| = {z:.2f} > {bound:.2f}"
    bound = normal.inv_cdf(1 - FALSE_ALARM / 8)
    for what, (c, c_per_pass), (e, e_per_pass), d in zip(
        ("mean", "std"), summaries_c, summaries_e, (dense.mean(), dense.std())
    ):
        se = ((c_per_pass.var() + e_per_pass.var()) / len(c_per_pass)).sqrt()
        assert (c - e).abs() <= bound * se + (e - d).abs(), (
            f"the average logits' {what}: {c:.4g} compiled, {e:.4g} eager, {d:.4g} eval; "
            f"standard error {se:.2g}, bound {bound:.2f}"
        )


@pytest.mark.parametrize("name", MODELS)
def test_training_step_and_output_statistics(name):
    """One compile serves both: the statistics' passes run the training step's graph."""
    model, inputs = _build(name)
    _explain_one_graph(model, inputs)
    compiled = torch.compile(model, backend="slicecompile", options=OPTIONS)
    torch.manual_seed(1)
    compiled(**inputs).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert _stats() == _training_stats(name)  # no fallback
    graphs = counters["slicecompile"]["graphs"]

    compiled_logits, eager_logits = _samples(lambda: compiled(**inputs)), _samples(lambda: model(**inputs))
    assert counters["slicecompile"]["graphs"] == graphs  # the passes reused the training step's graphs
    with torch.no_grad():
        dense = model.eval()(**inputs).logits.double().flatten()
    _assert_same_statistics(compiled_logits, eager_logits, dense)


@pytest.mark.parametrize("name", MODELS)
def test_eval_matches_eager(name):
    """Dropout off: no site is rewritten, and the compiled model is the dense one."""
    model, inputs = _build(name)
    model.eval()
    compiled = torch.compile(model, backend="slicecompile", options=OPTIONS)
    inputs64 = {key: value.double() if value.is_floating_point() else value for key, value in inputs.items()}
    with torch.no_grad():
        actual = compiled(**inputs).logits
        expected64 = copy.deepcopy(model).double()(**inputs64).logits
        eager = model(**inputs).logits
    assert_close(actual, expected64, eager, f"{name} logits")
    assert _stats() == {"sites": len(MODELS[name][2]), "skipped": len(MODELS[name][2])}
