"""Cross-entropy of a linear head over many targets, a chunk of targets at a time.

`F.cross_entropy(lm_head(hidden).float(), labels)` keeps the fp32 [M, V] logits for backward and
builds a gradient of the same size; with V = 49,152 this dominates a large batch's memory.
`chunked_cross_entropy` gives the same per-target losses and gradients while holding at most
[chunk, V] logits: forward keeps only each target's log-sum-exp ([M] floats) and backward computes
each chunk's logits again. The matmul runs in the inputs' dtype, as `lm_head` does, with logits,
softmax and the weight/bias gradient sums in fp32. A weight shared with the embeddings (tied) gets
this gradient added to its other ones by autograd, as usual.

Under torch.compile (fullgraph) the chunk loop is unrolled: the number of chunks, ceil(M / chunk),
is part of the graph, so each distinct count compiles once (dynamo's recompile limit, 8 by default,
caps how many; pick `chunk` so that few counts occur). M must be a size known on the host, as it is
for a batch with its host-built indices (fvlm.model.batch_index, what the loader gives); a batch
without them has an unbacked target count, on which the loop cannot be traced, and dynamo raises.
Labels must be valid class indices (no ignore_index).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(hidden, weight, bias).float()


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        chunk: int,
    ) -> torch.Tensor:
        losses = []
        lses = []
        for h, y in zip(hidden.split(chunk), labels.split(chunk)):
            logits = _logits(h, weight, bias)
            lse = torch.logsumexp(logits, dim=-1)
            lses.append(lse)
            losses.append(lse - logits.gather(1, y[:, None]).squeeze(1))
        lse_all = torch.cat(lses) if lses else hidden.new_zeros(0, dtype=torch.float32)
        ctx.save_for_backward(hidden, weight, bias, labels, lse_all)
        ctx.chunk = chunk
        return torch.cat(losses) if losses else lse_all.clone()

    @staticmethod
    def backward(ctx: Any, grad_losses: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, labels, lse_all = ctx.saved_tensors
        chunk = ctx.chunk
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = []
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        pieces = zip(hidden.split(chunk), labels.split(chunk), lse_all.split(chunk), grad_losses.split(chunk))
        for h, y, lse, g in pieces:
            # d loss / d logits = softmax - one_hot(label), scaled by the upstream gradient.
            probs = torch.exp(_logits(h, weight, bias) - lse[:, None])
            probs.scatter_add_(1, y[:, None], probs.new_full((y.shape[0], 1), -1.0))
            d_logits = probs * g.float()[:, None]
            if need_b:
                grad_b += d_logits.sum(0)
            d_logits = d_logits.to(weight.dtype)
            if need_h:
                grad_h.append(d_logits @ weight)
            if need_w:
                grad_w += (d_logits.t() @ h).float()
        gh = (torch.cat(grad_h) if grad_h else torch.zeros_like(hidden)) if need_h else None
        gw = grad_w.to(weight.dtype) if grad_w is not None else None
        gb = grad_b.to(bias.dtype) if grad_b is not None else None
        return gh, gw, gb, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    chunk: int,
) -> torch.Tensor:
    """Per-target CE [M] of `F.linear(hidden, weight, bias).float()` ([M, V]) against `labels` [M],
    computed `chunk` targets at a time (see the module docstring)."""
    if chunk <= 0:
        raise ValueError(f"chunk must be > 0, got {chunk}")
    out: torch.Tensor = _ChunkedCE.apply(hidden, weight, bias, labels, chunk)
    return out
