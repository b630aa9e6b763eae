"""slicecompile.explain(model, *args, **kwargs): which dropouts the backend would rewrite, and why.

Runs Dynamo over one call of the model with a backend that only detects (the graphs run
eagerly, nothing is compiled by Inductor) and collects every dropout site of every graph.
Like torch._dynamo.explain, it resets Dynamo's caches before and after.
"""

from dataclasses import dataclass, field

import torch

from .graphs import restart_with_constant_p
from .options import parse_options
from .sites import find_sites


@dataclass
class Report:
    """sites: one sites.Site per dropout, in graph order; graphs: how many graphs Dynamo made."""

    sites: list = field(default_factory=list)
    graphs: int = 0

    @property
    def rewritten(self):
        return [site for site in self.sites if site.rewritten]

    @property
    def skipped(self):
        return [site for site in self.sites if not site.rewritten]

    @property
    def dense_flops(self):
        """Forward + backward GEMM FLOPs of every matmul fed by a dropout, dense."""
        return sum(site.dense_flops for site in self.sites)

    @property
    def saved_flops(self):
        """Expected GEMM FLOPs skipped per training step by the rewritten sites."""
        return sum(site.saved_flops for site in self.sites)

    def __str__(self):
        header = ("site", "consumer", "input shape", "GEMMs (M,K,N)", "p", "side", "policy", "ms ours/Inductor")
        header += ("rewritten", "reason")
        rows = [header] + [_row(site) for site in self.sites]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * width for width in widths))
        share = self.saved_flops / self.dense_flops if self.dense_flops else 0.0
        lines.append(
            f"{len(self.rewritten)} of {len(self.sites)} sites rewritten in {self.graphs} graph(s); "
            f"predicted GEMM FLOPs saved per step (fwd+bwd): {self.saved_flops:.3g} of {self.dense_flops:.3g} "
            f"({share:.0%})"
        )
        return "\n".join(lines)


def _row(site):
    where = " ".join(part for part in (site.module, f"({site.location})" if site.location else "") if part)
    gemms = " ".join("x".join(str(size) for size in gemm) for gemm in site.gemms) or "-"
    shape = "x".join(str(size) for size in site.input_shape)
    p = "?" if site.p is None else f"{site.p:g}"
    side, policy = (site.side, site.policy) if site.rewritten else ("-", "-")
    rewritten = "yes" if site.rewritten else "no"
    timing = "/".join(f"{ms:.3g}" for ms in site.timing) if site.timing else "-"
    return (where or site.name, site.consumer, shape, gemms, p, side, policy, timing, rewritten, site.reason)


def explain(model, *args, options=None, **kwargs):
    """Detection only: the Report of what torch.compile(model, backend="slicecompile",
    options=options) would do on model(*args, **kwargs). Runs the model once, eagerly."""
    settings, _ = parse_options(options)
    report = Report()

    def detect(gm, example_inputs):
        restart_with_constant_p(gm)
        report.graphs += 1
        report.sites.extend(find_sites(gm, settings))
        return gm.forward

    torch._dynamo.reset()
    try:
        torch.compile(model, backend=detect)(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    return report
