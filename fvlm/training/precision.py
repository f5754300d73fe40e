"""Training precision (`train.precision`): what the model computes in and what the optimizer updates.

- `fp32`: parameters, activations and the update in fp32.
- `bf16`: the model's parameters live in bf16, so forward and backward run in bf16 with no per-op
  weight casts; the optimizer keeps an fp32 master copy of every trainable parameter (`MasterWeights`).
  After each micro-batch's backward the bf16 gradients are added into the masters' fp32 gradients
  (one multi-tensor copy, or add, per micro-batch); division by the step's token count, the all-reduce,
  clipping and AdamW (fused) all run on those fp32 gradients and masters, and the updated masters are
  rounded back into the bf16 parameters (one multi-tensor copy). The loss is computed in fp32 (the
  model's `text_loss` upcasts its logits) and the LLM's RMSNorm normalises in fp32 as transformers
  does it. Buffers (the rotary frequencies) stay fp32.
- `bf16-autocast`: fp32 parameters under `torch.autocast(bf16)`: every matmul casts its fp32 weight
  to bf16 on every call. Kept for comparison (benchmarks/step_ops.py counts the casts).
- `auto`: `bf16` on a CUDA device that supports it, else `fp32`.

Checkpoints hold the fp32 masters: inside `MasterWeights.fp32_view()` the model's trainable
parameters *are* the masters (their `.data` swapped in), so `save_model` writes, and loading
restores, exactly the fp32 weights the optimizer updates, in the same file format as an fp32 run;
a resumed run continues as if never stopped. Frozen parameters have no master: they are rounded to
bf16 once, and saved as those values (in fp32).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from fvlm.errors import UsageError

PRECISIONS = ("auto", "fp32", "bf16", "bf16-autocast")


def resolve(precision: str, device: torch.device) -> str:
    """The precision mode a run uses on `device`: fp32, bf16 or bf16-autocast (never auto)."""
    if precision not in PRECISIONS:
        raise UsageError(f"train.precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")
    cuda = device.type == "cuda"
    supported = not cuda or torch.cuda.is_bf16_supported()
    if precision == "auto":
        return "bf16" if cuda and supported else "fp32"
    if precision != "fp32" and not supported:
        raise UsageError(f"train.precision={precision}: this GPU has no bf16 support (use fp32)")
    return precision


def autocast(mode: str, device: torch.device) -> AbstractContextManager[Any]:
    """The context a forward pass runs in: autocast for `bf16-autocast` only."""
    if mode == "bf16-autocast":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


class MasterWeights:
    """fp32 master copies of a model's trainable parameters, the model itself turned to bf16.

    The optimizer is built over `masters` (`master_of` maps a model parameter to its master). Per
    step: `accumulate_grads()` after each backward, then the optimizer's work on the masters, then
    `publish()`. Nothing here reads a value back to the host.
    """

    def __init__(self, model: nn.Module, trainable: list[nn.Parameter]):
        self.model = model
        self.params = trainable
        # Parameters too (without requires_grad), so that everything taking a model's parameters
        # (the optimizer, clipping, the gradient all-reduce) takes them.
        self.masters = [nn.Parameter(p.detach().clone().float(), requires_grad=False) for p in trainable]
        self._by_param = {id(p): m for p, m in zip(trainable, self.masters)}
        # fp32 gradient storage, allocated on a parameter's first gradient and reused every step.
        self._buffers: list[torch.Tensor | None] = [None] * len(trainable)
        for param in model.parameters():
            if param.is_floating_point():
                param.data = param.data.to(torch.bfloat16)

    def master_of(self, param: nn.Parameter) -> nn.Parameter:
        return self._by_param[id(param)]

    @torch.no_grad()
    def accumulate_grads(self) -> None:
        """Adds the model's bf16 gradients into the masters' fp32 ones and frees them. A parameter
        that got no gradient in any micro-batch of the step keeps a master gradient of None, as an
        fp32 run's parameter does (AdamW then leaves it alone)."""
        fresh: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        summed: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        for i, (param, master) in enumerate(zip(self.params, self.masters)):
            grad = param.grad
            if grad is None:
                continue
            if master.grad is None:
                buffer = self._buffers[i]
                if buffer is None:
                    buffer = self._buffers[i] = torch.empty_like(master)
                master.grad = buffer
                fresh[0].append(buffer)
                fresh[1].append(grad)
            else:
                summed[0].append(master.grad)
                summed[1].append(grad)
            param.grad = None
        if fresh[0]:
            torch._foreach_copy_(fresh[0], fresh[1])
        if summed[0]:
            torch._foreach_add_(summed[0], summed[1])

    @torch.no_grad()
    def publish(self) -> None:
        """The masters, rounded to bf16 (round to nearest even), into the model's parameters."""
        targets: list[torch.Tensor] = list(self.params)
        sources: list[torch.Tensor] = list(self.masters)
        torch._foreach_copy_(targets, sources)

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None

    @contextmanager
    def fp32_view(self) -> Iterator[None]:
        """The model as an fp32 model for the duration: trainable parameters hold their masters (the
        same tensors: a load here writes the masters), frozen ones an fp32 copy on the CPU. On exit
        the bf16 parameters are set from what the view holds then (a load's weights included)."""
        trainable = {id(p) for p in self.params}
        frozen = [p for p in self.model.parameters() if p.is_floating_point() and id(p) not in trainable]
        kept_trainable = [p.data for p in self.params]
        kept_frozen = [p.data for p in frozen]
        for param, master in zip(self.params, self.masters):
            param.data = master
        for param in frozen:
            param.data = param.data.to("cpu", torch.float32)
        try:
            yield
        finally:
            views = [p.data for p in frozen]
            for param, data in zip(self.params, kept_trainable):
                param.data = data
            for param, data, view in zip(frozen, kept_frozen, views):
                param.data = data
                with torch.no_grad():
                    data.copy_(view)
            self.publish()
