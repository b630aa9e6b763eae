"""WeightCodes: a weight's SimHash codes kept between training steps of
hashed_linear_cross_entropy and refreshed on a schedule, as SLIDE rebuilds its hash tables every
so many iterations rather than every one.

Hashing all N weight rows costs bits * tables / M of the dense logits GEMM (simhash.py): 48 / M
with the defaults, which is 0.3% of it for a language model's head at M = 16k tokens but 19% for
an extreme classifier's batch of 256, more than the op's own GEMMs save at small `active`. The
rule of refresh="auto": re-hash at every step where that costs at most HASH_SHARE of a dense GEMM,
otherwise every ceil(bits * tables / (M * HASH_SHARE)) steps, so that hashing the weight costs
about HASH_SHARE of a dense GEMM a step on average whatever M is. Amazon-670K's batch of 256
re-hashes every 12 steps (SLIDE: every 50 at first); a head at 2,048 tokens every 2; 4,096 and
more tokens every step.

Codes between refreshes describe the weight as it was when last hashed. That changes which tiles
are chosen, never what the op computes over the tiles chosen: the loss and its gradients stay
exact for them. A refresh draws new hyperplanes from torch's generator; other steps draw only the
tie-breakers, so that torch.manual_seed and a new WeightCodes reproduce a run's selections.
"""

import math
import weakref

import torch

# Hashing's average share of one dense logits GEMM a step, under refresh="auto": the op itself
# does about 4 * active of one (0.2 at active 0.05), so hashing adds under a tenth of that.
HASH_SHARE = 1 / 64


class WeightCodes:
    """A weight's SimHash codes for hashed_linear_cross_entropy(..., weight_codes=...), re-hashed
    every `refresh` training calls ("auto": the module's rule, from the bits, tables and rows of
    the call), and whenever the weight is another tensor or changes shape, dtype or device, or
    bits or tables change. Under torch.compile the lookup runs outside the graph."""

    def __init__(self, refresh="auto"):
        if refresh != "auto" and (isinstance(refresh, bool) or not isinstance(refresh, int) or refresh < 1):
            raise ValueError(f'refresh must be "auto" or a positive int (calls between re-hashes), got {refresh!r}')
        self.refresh = refresh
        self.planes = self.codes = None
        self.calls_since_refresh = 0
        self._weight = self._key = None

    def period(self, bits, tables, m):
        """Calls between re-hashes for a call of m rows."""
        if self.refresh != "auto":
            return self.refresh
        return max(1, math.ceil(round(bits * tables / (max(m, 1) * HASH_SHARE), 9)))

    @torch.compiler.disable
    def due(self, weight, bits, tables, m):
        """Whether this call re-hashes; counts the call otherwise."""
        same = self._weight is not None and self._weight() is weight and self._key == _key(weight, bits, tables)
        if not same or self.calls_since_refresh + 1 >= self.period(bits, tables, m):
            return True
        self.calls_since_refresh += 1
        return False

    @torch.compiler.disable
    def keep(self, weight, bits, tables, planes, codes):
        """Hold a fresh hash of weight: its hyperplanes and lookup codes (simhash.lookup_codes)."""
        self.planes, self.codes, self.calls_since_refresh = planes, codes, 0
        self._weight, self._key = weakref.ref(weight), _key(weight, bits, tables)

    def reset(self):
        """Forget the codes: the next call re-hashes."""
        self.planes = self.codes = self._weight = self._key = None
        self.calls_since_refresh = 0

    def __repr__(self):
        return f"WeightCodes(refresh={self.refresh!r}, calls_since_refresh={self.calls_since_refresh})"


def _key(weight, bits, tables):
    return tuple(weight.shape), weight.dtype, weight.device, bits, tables
