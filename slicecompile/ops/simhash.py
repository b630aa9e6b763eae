"""Which output tiles each block-row of samples computes in hashed_linear_cross_entropy: SLIDE's
SimHash selection (Chen et al., MLSys 2020) at tile granularity.

Rows of x (flattened to (M, E)) are grouped in block-rows of BM consecutive samples; neurons
(rows of weight, (N, E)) in tiles of BN, the last one ragged. Every block-row gets the same
number of tiles, `budget` = min(n_tiles, ceil(active * N / BN)), ranked in this order:

1. tiles holding the block-row's true labels, those holding the most labels first;
2. the tiles SimHash ranks highest: a tile's score is the number of (sample of the block-row,
   neuron of the tile, table) triples whose codes collide (`bits` signed random projections a
   table, `tables` tables);
3. ties broken at random.

Label tiles therefore always fill the budget first. When a block-row's labels span more tiles
than the budget, the budget stays exact (static shapes, no host sync): its tiles are the label
tiles holding the most labels, and the op adds each row's own label neuron to that row's softmax
(hashed_linear_cross_entropy's module docstring).

Collisions are counted without comparing samples with neurons: per table, a histogram of the
2^bits codes of each block-row's samples (tables * n_blockrows * 2^bits float32s), in which each
neuron looks up its own code; a tile sums its neurons (n_blockrows * N * tables lookups). Hashing
all N weight rows costs bits * tables / M of the dense logits GEMM (E * N * bits * tables
multiply-adds against E * N * M; 48 / 256 at Amazon-670K's batch with the defaults). More bits
sharpen the ranking at no cost but the histograms': each tile holds BM * BN (sample, neuron)
pairs, and a background of BM * BN / 2^bits chance collisions a table drowns the few true ones
when bits are few. On planted data (E 64, N 2048, (16, 16) blocks, 1/8 of the tiles) the tiles
chosen held each sample's top neuron 45% of the time at 8 bits x 4 tables, 84% at 12 x 4 and 91%
at 16 x 4, against 12.5% for a random choice. Everything runs on x's device from torch's generator
(torch.manual_seed reproduces the selection), with shapes that depend only on the sizes.
"""

import math

import torch
import torch.nn.functional as F

MAX_BITS = 16
MAX_TABLES = 256
# Projections computed at a time (32 MiB of float32): (N, 128) @ (128, 32) on a CPU ran 2.4x
# slower in chunks of 2^15 rows than in one GEMM, 1.15x at 2^18 rows (Amazon-670K's layer).
HASH_CHUNK_ELEMENTS = 1 << 23


def tile_budget(n, block_n, active):
    """Tiles each block-row computes: ceil(active * N / BN), at least 1, at most the tile count.
    Rounded to 9 decimals first, so that 0.1 * 1280 / 128 (1.0000000000000002) is one tile."""
    n_tiles = -(-n // block_n)
    return max(1, min(n_tiles, math.ceil(round(active * n / block_n, 9))))


def draw_projections(features, bits, tables, n_blockrows, n_tiles, device, planes=True):
    """(tables * bits, features) float32 standard normal hyperplanes (None unless planes) and
    (n_blockrows, n_tiles) float64 uniform tie-breakers in [0, 1), from one draw of torch's
    generator (a compiler may reorder independent draws; one draw keeps the selection
    reproducible)."""
    n_planes = tables * bits * features if planes else 0
    uniform = torch.rand(n_planes + n_blockrows * n_tiles, device=device)
    tie_breaks = uniform[n_planes:].view(n_blockrows, n_tiles).double()
    if not planes:
        return None, tie_breaks
    # Inverse CDF; clamped away from 0 and 1, where erfinv is infinite.
    tiny = torch.finfo(torch.float32).tiny
    normal = torch.special.erfinv(uniform[:n_planes].clamp(tiny, 1 - 2**-24) * 2 - 1) * math.sqrt(2)
    return normal.view(tables * bits, features), tie_breaks


def simhash_codes(rows, planes, bits, tables):
    """(R, tables) float32 codes of rows (R, E), exact integers: bit k of table t is whether
    row · plane[t * bits + k] is positive. The signs overwrite the projections in place and a
    small GEMM weighs them by powers of two: 2.5x faster than int64 shifts and a sum on a CPU."""
    signs = (rows @ planes.to(rows.dtype).t()).gt_(0).float()
    powers = 2.0 ** torch.arange(bits, device=rows.device, dtype=torch.float32)
    return signs.view(-1, tables, bits) @ powers


def code_histograms(rows, planes, bits, tables, group_size, n_groups):
    """(tables, n_groups, 2^bits) float32: per table, how many of the rows in each group of
    group_size consecutive rows hash to each code, rows hashed HASH_CHUNK_ELEMENTS projections at
    a time."""
    device, codes = rows.device, 2**bits
    hist = torch.zeros(tables * n_groups * codes, device=device)
    table_offset = torch.arange(tables, device=device) * (n_groups * codes)
    chunk_rows = max(1, HASH_CHUNK_ELEMENTS // (bits * tables))
    for start in range(0, rows.shape[0], chunk_rows):
        chunk = rows[start : start + chunk_rows]
        group = torch.arange(start, start + chunk.shape[0], device=device) // group_size
        flat = (group * codes)[:, None] + table_offset + simhash_codes(chunk, planes, bits, tables).long()
        hist.index_add_(0, flat.flatten(), torch.ones((), device=device).expand(flat.numel()))
    return hist.view(tables, n_groups, codes)


def lookup_codes(weight, planes, bits, tables):
    """(N, tables) int64 codes of weight's rows, table t's offset by t * 2^bits: the columns
    collision_counts looks each neuron up in."""
    chunk_rows = max(1, HASH_CHUNK_ELEMENTS // (bits * tables))
    offset = torch.arange(tables, device=weight.device) * 2**bits
    starts = range(0, weight.shape[0], chunk_rows)
    return torch.cat([simhash_codes(weight[s : s + chunk_rows], planes, bits, tables) for s in starts]).long() + offset


def collision_counts(x2d, codes, planes, bits, tables, block):
    """(n_blockrows, n_tiles) float32: per block-row and output tile, the number of (sample,
    neuron, table) code collisions, exact below 2^24, for neurons of lookup_codes `codes`. Each
    neuron looks its codes up in the block-rows' histograms, and a tile sums its neurons:
    n_blockrows * N * tables lookups, and memory that does not grow with 2^bits past the
    histograms themselves."""
    (block_m, block_n), m, n = block, x2d.shape[0], codes.shape[0]
    n_blockrows = -(-m // block_m)
    hist = code_histograms(x2d, planes, bits, tables, block_m, n_blockrows)
    lookup = hist.permute(1, 0, 2).reshape(n_blockrows, tables * 2**bits)
    # Whole tiles a chunk, so that each chunk's neurons sum into its own tiles.
    chunk_rows = max(1, HASH_CHUNK_ELEMENTS // (tables * n_blockrows) // block_n) * block_n
    scores = []
    for start in range(0, n, chunk_rows):
        chunk = codes[start : start + chunk_rows]
        per_neuron = lookup.index_select(1, chunk.flatten()).view(n_blockrows, -1, tables).sum(-1)
        scores.append(F.pad(per_neuron, (0, -per_neuron.shape[1] % block_n)).view(n_blockrows, -1, block_n).sum(-1))
    return torch.cat(scores, dim=1)


def label_counts(target, ignore_index, block, n_blockrows, n_tiles):
    """(n_blockrows, n_tiles) float32: how many of each block-row's labels fall in each tile
    (rows whose target is ignore_index count nowhere)."""
    labelled = target != ignore_index
    rows = torch.arange(target.shape[0], device=target.device) // block[0]
    tile = torch.where(labelled, target, 0) // block[1]
    counts = torch.zeros(n_blockrows * n_tiles, device=target.device)
    return counts.index_add_(0, rows * n_tiles + tile, labelled.float()).view(n_blockrows, n_tiles)


def rank_tiles(labels, collisions, tie_breaks, budget, most_collisions):
    """(n_blockrows, budget) int64 tile indices, ascending: the block-row's `budget` tiles of
    highest (label count, collisions, tie-break) in that order of priority: float64 keys, whose
    integer part (at most BM * (BM * BN * tables + 1)) leaves the tie-break 20 bits or more for
    blocks up to (1024, 1024) and 16 tables."""
    key = labels.double() * (most_collisions + 1) + collisions.double() + tie_breaks
    return key.topk(budget, dim=1, sorted=False).indices.sort(dim=1).values


@torch.no_grad()
def select_tiles(x2d, weight, target, budget, block, bits, tables, ignore_index, weight_codes=None):
    """select_active_tiles on checked, flattened operands (hashed_linear_cross_entropy checks);
    weight's codes from weight_codes (a WeightCodes) where given, else hashed afresh."""
    (m, e), n = x2d.shape, weight.shape[0]
    n_blockrows, n_tiles = -(-m // block[0]), -(-n // block[1])
    fresh = weight_codes is None or weight_codes.due(weight, bits, tables, m)
    planes, tie_breaks = draw_projections(e, bits, tables, n_blockrows, n_tiles, x2d.device, planes=fresh)
    if fresh:
        codes = lookup_codes(weight.detach(), planes, bits, tables)
        if weight_codes is not None:
            weight_codes.keep(weight, bits, tables, planes, codes)
    else:
        planes, codes = weight_codes.planes, weight_codes.codes
    collisions = collision_counts(x2d.detach(), codes, planes, bits, tables, block)
    labels = label_counts(target, ignore_index, block, n_blockrows, n_tiles)
    return rank_tiles(labels, collisions, tie_breaks, budget, block[0] * block[1] * tables)
