"""What `options={...}` of `torch.compile(model, backend="slicecompile", options=...)` may set:
our Options, and the Inductor config keys passed through."""

import os
from dataclasses import dataclass, fields, replace

import torch
import torch._inductor.config  # noqa: F401  (parse_options reads its keys)

from ..ops import DEFAULT_BLOCK
from ..ops.checks import check_block
from ..ops.dropout_attention import ATTENTION_POLICIES
from .verdicts import MODES

POLICIES = ("block", "slice")


@dataclass(frozen=True)
class Options:
    """What options={...} may set besides Inductor's own keys."""

    block: tuple = DEFAULT_BLOCK  # the tile of the dropped matrix: (BM, BK) of the input, (BM, BN) of the output
    policy: str = "block"  # or "slice": one window of input features per linear layer (other sites stay block)
    input_side: bool = True  # rewrite dropout -> matmul
    output_side: bool = True  # rewrite matmul -> dropout
    min_gemm_size: int | None = None  # None: sites gated by their work (size_gate.py); an int: by M*K*N
    enabled: bool = True
    samples_per_group: int = 8  # dropout -> conv2d, block policy: samples sharing one channel mask
    hashed_outputs: float | None = None  # active share: F.cross_entropy(linear(x)) over hashed output tiles
    rewrite: str = "auto"  # on a GPU, only sites timed faster than Inductor (verdicts.py); or "always"
    attention: str = "dropout"  # attention: "dropout" of probability tiles, or "dropkey" (keys, before the softmax)


OPTION_NAMES = tuple(f.name for f in fields(Options))


def parse_options(options):
    """Split options={...} into our Options and the Inductor config patches; an unknown key
    raises ValueError listing the known ones."""
    ours, inductor = {}, {}
    inductor_keys = torch._inductor.config.get_config_copy()
    for key, value in (options or {}).items():
        if key in OPTION_NAMES:
            ours[key] = value
        elif key.replace("-", "_") in inductor_keys:
            inductor[key] = value
        else:
            raise ValueError(
                f"unknown slicecompile option {key!r}; slicecompile options are {', '.join(OPTION_NAMES)}, "
                "and any torch._inductor option (torch._inductor.list_options()) is passed to Inductor"
            )
    return _validated(replace(Options(), **ours)), inductor


def _validated(options):
    block = check_block(options.block)
    if options.policy not in POLICIES:
        raise ValueError(f"unknown policy {options.policy!r}; known policies: {', '.join(POLICIES)}")
    active = options.hashed_outputs
    if active is not None and (isinstance(active, bool) or not isinstance(active, (int, float)) or not 0 < active <= 1):
        raise ValueError(f"hashed_outputs must be None or an active share in (0, 1], got {active!r}")
    if options.attention not in ATTENTION_POLICIES:
        known = ", ".join(ATTENTION_POLICIES)
        raise ValueError(f"unknown attention policy {options.attention!r} (option attention); known policies: {known}")
    if options.rewrite not in MODES:
        raise ValueError(f"unknown rewrite mode {options.rewrite!r}; known modes: {', '.join(MODES)}")
    size = options.min_gemm_size
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise ValueError(f"min_gemm_size must be an int >= 0, or None (the size gate by work), got {size!r}")
    for name in ("enabled", "input_side", "output_side"):
        if not isinstance(getattr(options, name), bool):
            raise TypeError(f"{name} must be a bool, got {getattr(options, name)!r}")
    group = options.samples_per_group
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ValueError(f"samples_per_group must be a positive int, got {group!r}")
    return replace(options, block=block)


def disabled_by_env():
    return os.environ.get("SLICECOMPILE_DISABLE", "0") not in ("", "0")
