"""Can one static query on a frozen tiny DINO read the colour of the marked task's marked object?

    .venv/bin/python benchmarks/probe_marked_query.py DINO_FOLDER [--checkpoint RUN/checkpoints/step_N/model.safetensors]

What the coarse token of the marked task needs of the encoder: a query that does not depend on the
frame (the static, CLS-started query of the foveated model) has to find the object on the white mark
among four and carry its colour. Here such a query (one learned vector, started at DINO's CLS as
`model.query_init=cls` starts it) and a linear colour head are fitted on frozen-encoder stills of the
bench's kind (four objects of distinct colours and shapes, the first on the mark), and scored on
others. Printed: the colour accuracy (chance 1/7: white is kept for the mark), the attention mass on
the marked object's patches per DINO layer after fitting and at the CLS start, and what uniform
attention puts there. With `--checkpoint`, the encoder weights of an fvlm checkpoint (its
`encoder.dino.*` tensors) replace the folder's: the same measurement after a Phase 1 run has trained
the encoder. The frames come from seed streams of their own (not the synthetic splits'); single
thread, deterministic for a seed.
"""

from __future__ import annotations

import argparse
import io

import numpy as np
import torch
from PIL import Image
from transformers import Dinov2Model

from fvlm.data.decode import normalise
from fvlm.data.synth import COLOURS, MARKED_OBJECTS, _crowd, _paint_marked, _Painter, mark_box
from fvlm.model.encoder import DinoEncoder, cls_embedding

PALETTE = [c for c in COLOURS if c != "white"]  # the marked task's colours


def marked_stills(seed: int, n: int, size: int, patch: int):
    """n bench-like stills: normalised pixels, the marked object's colour index, and a [n, P] map of
    the patches its mark's square touches."""
    p = _Painter(size, np.random.default_rng([seed, 7_000_001]), min_objects=MARKED_OBJECTS, max_objects=MARKED_OBJECTS)
    grid = size // patch
    pixels, colours, where = [], [], []
    for _ in range(n):
        palette, shapes, sizes, _, _, (x, y), others = _crowd(p, MARKED_OBJECTS, 0.0, distinct_shapes=True)
        d = sizes[0]
        canvas = p.background()
        _paint_marked(p, canvas, others, palette[0], shapes[0], d, x, y)
        pixels.append(np.asarray(Image.open(io.BytesIO(p.finish(canvas))).convert("RGB")))
        colours.append(PALETTE.index(palette[0]))
        mark = np.zeros((size, size), dtype=bool)
        mark[mark_box(x, y, d)] = True
        where.append(mark.reshape(grid, patch, grid, patch).any(axis=(1, 3)).flatten().astype(np.float32))
    return torch.as_tensor(normalise(np.stack(pixels))), torch.tensor(colours), torch.as_tensor(np.stack(where))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dino", help="a Dinov2Model folder (e.g. a tiny-backbones-*/tiny-dino)")
    parser.add_argument("--checkpoint", help="an fvlm model.safetensors whose encoder.dino.* weights to use")
    parser.add_argument("--fit", type=int, default=1500, help="stills to fit the query and head on")
    parser.add_argument("--test", type=int, default=500, help="held-out stills to score")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    dino = Dinov2Model.from_pretrained(args.dino).float().eval()
    if args.checkpoint:
        from safetensors.torch import load_file

        prefix = "encoder.dino."
        state = {k[len(prefix) :]: v for k, v in load_file(args.checkpoint).items() if k.startswith(prefix)}
        if not state:
            raise SystemExit(f"{args.checkpoint}: no {prefix}* tensors (not an fvlm foveated checkpoint?)")
        dino.load_state_dict(state)
    for p in dino.parameters():
        p.requires_grad_(False)
    encoder = DinoEncoder(dino)
    size, patch = dino.config.image_size, dino.config.patch_size
    (fit_x, fit_y, _), (test_x, test_y, test_where) = (
        marked_stills(args.seed * 2 + k, n, size, patch) for k, n in ((0, args.fit), (1, args.test))
    )
    with torch.no_grad():
        fit_cache, test_cache = encoder.encode_patches(fit_x), encoder.encode_patches(test_x)
    start = cls_embedding(dino)
    query = torch.nn.Parameter(start.clone())
    head = torch.nn.Linear(start.numel(), len(PALETTE))
    opt = torch.optim.Adam([query, *head.parameters()], lr=1e-2)
    for _ in range(args.steps):
        rows = torch.randint(0, len(fit_y), (64,))
        token, _ = encoder.deep_query(fit_cache.select(rows), query.expand(len(rows), -1))
        loss = torch.nn.functional.cross_entropy(head(token), fit_y[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()

    def mass(q):
        _, weights = encoder.deep_query(test_cache, q.expand(len(test_y), -1))  # [N, layers, heads, 1 + P]
        per_layer = (weights[..., 1:] * test_where[:, None, None, :]).sum(-1).mean((0, 2))
        return " / ".join(f"{float(v):.3f}" for v in per_layer)

    with torch.no_grad():
        token, _ = encoder.deep_query(test_cache, query.expand(len(test_y), -1))
        accuracy = float((head(token).argmax(-1) == test_y).float().mean())
        fitted, at_cls = mass(query), mass(start)
    uniform = float(test_where.sum(-1).mean() / (1 + test_where.shape[1]))
    print(
        f"static query reads the marked colour: {accuracy:.3f} (chance {1 / len(PALETTE):.3f}, {args.test} held-out "
        f"stills); attention mass on the mark per layer: fitted {fitted}, CLS start {at_cls}, uniform {uniform:.3f}"
    )


if __name__ == "__main__":
    main()
