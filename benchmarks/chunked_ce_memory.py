"""Memory the text loss keeps for backward, plain vs chunked (model.ce_chunk), at SmolLM2's head.

The bytes of the tensors autograd saves in the forward pass (distinct storages, the head's weight
left out since it is a parameter held anyway), measured with torch.autograd.graph.saved_tensors_hooks.
Run: .venv/bin/python benchmarks/chunked_ce_memory.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fvlm.model.chunked_ce import chunked_cross_entropy

M, D, V = 2000, 576, 49_152


def saved_mib(fn, hidden: torch.Tensor, weight: torch.Tensor) -> float:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() != weight.data_ptr():
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(hidden.clone().requires_grad_()).sum()
    return sum(storages.values()) / 2**20


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(V, D) * 0.02)
    hidden = torch.randn(M, D)
    labels = torch.randint(0, V, (M,))
    plain = saved_mib(lambda h: F.cross_entropy(F.linear(h, weight).float(), labels, reduction="none"), hidden, weight)
    print(f"M={M} D={D} V={V} fp32: plain saves {plain:.1f} MiB")
    for chunk in (256, 1024):
        mib = saved_mib(lambda h: chunked_cross_entropy(h, weight, None, labels, chunk), hidden, weight)
        transient = chunk * V * 4 / 2**20
        print(f"ce_chunk={chunk}: saves {mib:.2f} MiB; one chunk's logits {transient:.0f} MiB while computed")


if __name__ == "__main__":
    main()
