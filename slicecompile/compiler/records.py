"""Site: one place in a graph the pass considered (a dropout, an attention call, a loss) and what
it decided, shared by the backend, rewrite.py and explain()."""

from dataclasses import dataclass, field

from torch.fx import Node

from .verdicts import SLOWER

# Skips the user asked for (by the call or the options), as opposed to what the pass cannot do.
EVAL_MODE = "eval mode (training=False)"
IDENTITY = "p = 0 (dropout is the identity)"
DISABLED = "disabled by options"
INPUT_SIDE_OFF = "input side turned off (input_side=False)"
OUTPUT_SIDE_OFF = "output side turned off (output_side=False)"
REQUESTED = frozenset({EVAL_MODE, IDENTITY, DISABLED, INPUT_SIDE_OFF, OUTPUT_SIDE_OFF})


@dataclass
class Site:
    """One dropout (or attention call, or loss) in the graph and what the pass decided about it."""

    name: str  # the dropout node
    module: str  # module path of the dropout, "" for a functional call in the top-level forward
    location: str  # file:line of the dropout call
    p: float | None  # the dropout's p; a loss site's active share
    consumer: str  # the matmul kind(s) (made the dropout's input, on the output side), or what rules it out
    pattern: str | None  # the PATTERNS row that matched, if any
    input_shape: tuple  # the dropout input's shape (dynamic sizes at their first-seen value)
    dtype: str
    device: str
    gemms: tuple = ()  # (M, K, N) per consuming matmul
    rewritten: bool = False
    reason: str = ""
    policy: str = "block"  # how the rewrite drops: "block" tiles, one "slice" window, or attention's "dropkey"
    # the dropped matrix: the matmul's "input", its "output", the "attention" probabilities; or a
    # "loss" computed over hashed output tiles
    side: str = "input"
    node: Node | None = field(default=None, repr=False)  # the dropout node, for rewrite.py
    matches: list = field(default_factory=list, repr=False)  # (consumer node, Match), for rewrite.py
    timing: tuple | None = None  # (ours, Inductor's) ms forward+backward, timed under rewrite="auto"

    @property
    def requested(self):
        """Skipped because the call or the options asked for it (eval mode, p = 0, a side off,
        timed slower under rewrite="auto")."""
        return self.reason in REQUESTED or self.reason.startswith(SLOWER)

    @property
    def dense_flops(self):
        """Forward + both backward GEMMs, dense."""
        return sum(6 * m * k * n for m, k, n in self.gemms)

    @property
    def saved_flops(self):
        """Expected FLOPs skipped: a fraction p of each of the three GEMMs; for attention none
        (its kernels zero a dropped tile's P rather than branch around it, so that their loads
        pipeline), but under "dropkey" a fraction p of all six (a dropped tile is never visited;
        slightly less in fact, as a block-row left with no visible tile keeps one); for a loss
        over hashed outputs, all but four GEMMs of the active share (its backward recomputes the
        logits)."""
        if not self.rewritten or self.side == "attention" and self.policy != "dropkey":
            return 0
        if self.side == "loss":
            return max(0, round(self.dense_flops * (1 - 4 / 3 * self.p)))
        return round(self.p * self.dense_flops)
