"""How the ranks' gradients meet: PyTorch's DistributedDataParallel (`train.distributed: ddp`, the
default) or FSDP2 (`fsdp`: `fully_shard`, parameters, gradients and optimizer state sharded over
ranks), and nothing at all in a single process.

Losses. Each micro-batch is backpropagated as a token *sum*; the engines are told to sum gradients
over ranks rather than average them (a summing communication hook for DDP, a divide factor of 1
for FSDP2), so the trainer divides once by the step's all-reduced token count, exactly as in one
process with the ranks' micro-batches accumulated.

Skipped steps. A step is skipped by every rank together when it holds no target tokens or a rank
ran out of memory. The engines reduce gradients inside the backward of the step's last micro-batch
(the ones before it run under `no_sync`), so the ranks agree before that backward: the trainer
all-reduces [target tokens, out-of-memory flag] first. Target tokens are counted on the host from
the CPU batches (`target_tokens`), before any forward; a rank that ran out of memory in an earlier
micro-batch says so. If the step is skipped no rank runs the last micro-batch and the gradients
accumulated so far (local, never reduced) are dropped. What stays unrecoverable: running out of
memory inside the last micro-batch's forward or backward on one of several ranks (the others are
already inside the gradient collective), and under FSDP2 in any micro-batch (its forward gathers
parameters with collectives); either fails the run rather than hanging it.

Checkpoints. DDP wraps the model without touching it, so the trainer saves and loads the plain
module as in one process. FSDP2 shards the module in place: its weights and optimizer state are
gathered into full, unsharded state dicts (`torch.distributed.checkpoint.state_dict`) with the same
names and layout a single process writes, so a checkpoint does not depend on the engine that wrote it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.distributed as torch_dist
from torch import nn

from fvlm.training.dist import Dist

ENGINES = ("ddp", "fsdp")
EngineKind = Literal["ddp", "fsdp"]


def target_tokens(batch: Mapping[str, Any]) -> int:
    """A CPU batch's target-token count, the model's `n_tokens` without a forward: a loss-mask
    position counts when a real position precedes it in [visual block + text], that is when the
    sample has a real frame or a real text token before it (the predictor rule of `text_loss`)."""
    if batch.get("n_targets") is not None:  # counted by the loader's collate, by the same rule
        return int(batch["n_targets"])
    text = batch["attention_mask"].long()
    earlier_text = (text.cumsum(1) - text) > 0
    has_frames = batch["frame_mask"].bool().any(1, keepdim=True)
    return int((batch["loss_mask"].bool() & (earlier_text | has_frames)).sum())


def _sum_hook(process_group, bucket):
    """DDP's all-reduce without its division by the world size: gradients are summed over ranks.
    Unannotated: DDP checks a hook's annotations at run time, and this module's are postponed strings."""
    work = torch_dist.all_reduce(bucket.buffer(), group=process_group, async_op=True)
    assert work is not None  # async_op=True returns the work handle
    return work.get_future().then(lambda fut: fut.value()[0])


class Engine:
    """The model as the training step runs it. `module` is the model itself (sharded in place under
    FSDP2); calling the engine runs the training forward (through DDP's wrapper under DDP)."""

    def __init__(self, model: nn.Module, dist: Dist, kind: EngineKind = "ddp"):
        self.module = model
        self.dist = dist
        self.kind: Literal["single", "ddp", "fsdp"] = kind if dist.enabled else "single"
        self._forward: nn.Module = model
        if self.kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            # Buffers (rotary frequencies, position ids) are constants: no broadcast every forward.
            # No unused-parameter search: every trainable parameter is in every step's graph (the
            # text-only path keeps the vision side in it; DINO's unused mask token is frozen).
            ddp = DistributedDataParallel(
                model,
                device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
                broadcast_buffers=False,
            )
            ddp.register_comm_hook(None, _sum_hook)
            self._forward = ddp
        elif self.kind == "fsdp":
            self._shard(model)

    def _shard(self, model: nn.Module) -> None:
        from torch.distributed.fsdp import FSDPModule, fully_shard

        self.dist.broadcast_model(model)  # fully_shard keeps each rank's own slice: start from rank 0's
        # The whole model is one unit: its weights are gathered once per forward and its gradients
        # reduce-scattered once per backward. Smaller units (each LLM decoder layer) would gather a
        # different number of times on different ranks: a forward runs the LLM once for a text-only
        # batch and twice (coarse and fine pass) for one with frames, and ranks whose collectives do
        # not pair up hang. What FSDP2 saves here is the memory of AdamW's moments and of the
        # gradients between steps (both sharded), not that of the weights during a step.
        sharded = fully_shard(model)
        assert isinstance(sharded, FSDPModule)
        # A plain SUM: no division, and no PREMUL_SUM (which gloo lacks).
        sharded.set_gradient_divide_factor(1.0)
        sharded.set_force_sum_reduction_for_comms(True)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._forward(*args, **kwargs)

    @property
    def sharded(self) -> bool:
        """Forwards are collectives: every rank must run the same number of them (evaluation too)."""
        return self.kind == "fsdp"

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward without the gradient collective (every micro-batch of a step but the last)."""
        if self.kind == "ddp":
            assert isinstance(self._forward, torch.nn.parallel.DistributedDataParallel)
            with self._forward.no_sync():
                yield
        elif self.kind == "fsdp":
            self.module.set_requires_gradient_sync(False)  # type: ignore[operator]
            try:
                yield
            finally:
                self.module.set_requires_gradient_sync(True)  # type: ignore[operator]
        else:
            yield

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        """The global gradient norm (over every rank's shard under FSDP2), clipping to max_norm: a
        device tensor, read by nobody until a step is logged."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        full_tensor = getattr(norm, "full_tensor", None)  # a DTensor of partial norms under FSDP2
        return full_tensor() if full_tensor is not None else norm

    # ------------------------------------------------------------------ checkpoints
    def full_model_state(self) -> dict[str, torch.Tensor] | None:
        """Collective under FSDP2: the unsharded weights on the CPU of rank 0 (None elsewhere).
        None for the other engines, whose module is saved as it is."""
        if self.kind != "fsdp":
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return (
            {name: value for name, value in state.items() if isinstance(value, torch.Tensor)}
            if self.dist.is_main
            else None
        )

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Collective under FSDP2. The optimizer's state dict as one process writes it (parameters
        numbered in group order); under FSDP2 gathered whole, meaningful on rank 0."""
        if self.kind != "fsdp":
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        full: dict[str, Any] = dict(
            get_optimizer_state_dict(
                self.module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        )
        if not self.dist.is_main:
            return {}
        index = {name: i for i, name in enumerate(n for group in _param_names(self.module, optimizer) for n in group)}
        return {
            "state": {index[name]: value for name, value in full["state"].items()},
            "param_groups": [
                {**group, "params": [index[name] for name in group["params"]]} for group in full["param_groups"]
            ],
        }

    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        """FSDP2 only: full weights (as `full_model_state` gathers them) into the sharded module."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        missing, unexpected = set_model_state_dict(
            self.module, dict[str, Any](state), options=StateDictOptions(full_state_dict=True, strict=False)
        )
        # A weight tied to another (the LLM's head and embeddings) is stored once under one name.
        tied = _tied_names(self.module)
        missing = [name for name in missing if name not in tied]
        if missing or unexpected:
            raise RuntimeError(f"weights do not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        if self.kind != "fsdp":
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = [n for group in _param_names(self.module, optimizer) for n in group]
        full: dict[str, Any] = {
            "state": {names[i]: value for i, value in state["state"].items()},
            "param_groups": [
                {**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]
            ],
        }
        set_optimizer_state_dict(
            self.module,
            optimizer,
            full,
            options=StateDictOptions(full_state_dict=True, strict=True),
        )


def _param_names(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """Each optimizer group's parameters by name, in the group's order."""
    name_of = {id(p): name for name, p in module.named_parameters()}
    return [[name_of[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def _tied_names(module: nn.Module) -> set[str]:
    """Names of parameters that are another parameter under a second name."""
    first = {id(p): name for name, p in module.named_parameters()}
    return {name for name, p in module.named_parameters(remove_duplicate=False) if first[id(p)] != name}
