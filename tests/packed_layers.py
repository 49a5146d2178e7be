"""Random packed MoE layers (docs/FORMAT.md §4, layout v2: expert matrices in tiles of 16 rows) for the packing,
kernel and export tests. H and 2I must be multiples of 16."""

import numpy as np

from mopeq_export.quantization import packing as P


def random_layer(rng, expert_bits, h, i, g):
    layer = {}
    for m, rows, k in (("w1", 2 * i, h), ("w2", h, i)):
        codes = [rng.integers(0, 1 << b, (rows, k), dtype=np.uint8) for b in expert_bits]
        for b, words in P.split_by_width(codes, expert_bits).items():  # tiled [E_b, rows/16, NB*b, 16]
            layer[f"{m}.q{b}"] = words
        G = P.num_groups(k, g)
        # weights of about +-0.05 at every width, like a trained layer (keeps activations finite)
        step = np.array([0.1 / ((1 << b) - 1) for b in expert_bits])[:, None, None]
        scales = (step * rng.uniform(0.5, 1.5, (len(expert_bits), rows, G))).astype(np.float16)
        zeros = np.stack([rng.integers(0, 1 << b, (rows, G), dtype=np.uint8) for b in expert_bits])
        layer[f"{m}.scales"] = P.tile_rows(scales)  # [E, rows/16, G, 16]
        layer[f"{m}.zeros"] = P.tile_rows(zeros)
    return layer
