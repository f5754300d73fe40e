"""Direct preference optimisation (DPO) for stage 3: `train.dpo.enabled=true`.

Data. Every train sample is a preference pair (docs/design.md §5): an ordinary sample whose
`assistant` is the chosen answer, plus `rejected`. `PreferenceReader` encodes both answers after the
same prompt (answer tokens only are targets), and a batch carries `rejected_input_ids`,
`rejected_attention_mask` and `rejected_loss_mask` beside the chosen answer's tensors.

Log-probabilities. A pair's log-probability under a model is minus the summed cross entropy of its
answer tokens given the visual tokens and the prompt (`VLMBase.loss_over(..., per_sample=True)`).
The visual block is computed once per pair, in the model's default mode, and read by both answers.

Loss (beta = train.dpo.beta, with policy and reference log-ratios of chosen (c) and rejected (r)
answers, h = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r))):
- sigmoid (Rafailov et al. 2023): -log sigmoid(beta h); with label smoothing e the conservative
  form -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h);
- ipo (Azar et al. 2023): (h - 1 / (2 beta))^2 over summed log-probabilities.
With train.dpo.sft_weight alpha > 0, each pair's loss gains alpha x the chosen answer's mean per-token
negative log-likelihood under the policy, -log pi(c) / |c| (the "DPO + SFT" regulariser of Pang et
al. 2024, RPO): it keeps the chosen answers' log-probabilities from falling while the margin grows.
Implicit rewards are beta x the log-ratios; the reward margin is their difference (beta h) and the
reward accuracy the share of pairs with a positive margin.

Reference. A second copy of the model loaded from train.init_from (the stage-2 result), in eval
mode, with every parameter frozen; it never enters the optimizer, so its weights never change.

Step accounting. The trainer's step mean is over the step's "tokens"; here the unit is the pair:
each micro-batch backpropagates its summed pair losses and the step divides by the pair count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

from fvlm.data.decode import SampleError, read_meta
from fvlm.data.index import read_sample
from fvlm.data.loader import BatchCollate, Loader, SampleReader, collate, load_index, split_path, static_shapes
from fvlm.data.schedule import TrainSchedule, source_probabilities
from fvlm.errors import UsageError
from fvlm.model.backbones import spec_pixel_stats
from fvlm.model.batch_index import bucket
from fvlm.model.build import build_model
from fvlm.model.flops import estimate_flops
from fvlm.model.vlm import Batch, VLMBase
from fvlm.training import checkpoint as ckpt
from fvlm.training.evaluate import to_device
from fvlm.training.trainer import StepTally, Trainer, load_init_weights

DPO_COLUMNS = (
    "dpo_chosen_logp",
    "dpo_rejected_logp",
    "dpo_reward_margin",
    "dpo_reward_accuracy",
    "dpo_chosen_nll",
)
REJECTED_KEYS = ("rejected_input_ids", "rejected_attention_mask", "rejected_loss_mask")


# ----------------------------------------------------------------------------- the loss


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses [B] and the chosen and rejected implicit rewards [B] (detached), from sequence
    log-probabilities [B] of the policy and the reference (see the module's docstring)."""
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    h = chosen_ratio - rejected_ratio
    if loss == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss!r}; expected sigmoid or ipo")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def with_sft_term(
    losses: torch.Tensor, policy_chosen: torch.Tensor, chosen_tokens: torch.Tensor, sft_weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair losses [B] plus sft_weight x the chosen answer's mean per-token NLL under the policy,
    -policy_chosen / chosen_tokens (RPO's regulariser), and that NLL [B] (detached). An answer
    without a target token counts one, so its NLL is 0."""
    nll = -policy_chosen / chosen_tokens.clamp_min(1).to(policy_chosen.dtype)
    total = losses + sft_weight * nll if sft_weight else losses
    return total, nll.detach()


def pair_logps(model: VLMBase, batch: Any, mode: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`sequence_logps`, plus the chosen answers' target token counts [B]."""
    mode = mode or model.default_mode
    tokens, mask, _ = model.visual_blocks(batch, (mode,))[mode]
    rejected: Batch = {
        "input_ids": batch["rejected_input_ids"],
        "attention_mask": batch["rejected_attention_mask"],
        "loss_mask": batch["rejected_loss_mask"],
    }
    chosen_ce, chosen_tokens = model.loss_over(tokens, mask, batch, per_sample=True)
    rejected_ce, _ = model.loss_over(tokens, mask, rejected, per_sample=True)
    return -chosen_ce, -rejected_ce, chosen_tokens


def sequence_logps(model: VLMBase, batch: Any, mode: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities [B] of the chosen and the rejected answers of a pair batch, both read
    after the same visual block (one DINO pass, in `mode`, default the model's own)."""
    chosen, rejected, _ = pair_logps(model, batch, mode)
    return chosen, rejected


# ----------------------------------------------------------------------------- data


class PreferenceReader(SampleReader):
    """A SampleReader that also encodes each sample's `rejected` answer (a sample without one is
    skipped and counted as `no_rejected_answer`)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # Decoded samples are cached per process by their settings: a pair is not a plain sample.
        self._settings: tuple[Any, ...] = (*self._settings, "preference")

    def _decode(self, row: int) -> dict:
        sample = super()._decode(row)
        index = self.index
        shard = index.shards[index.shard_id[row]]
        key, parts = read_sample(shard, int(index.start[row]), int(index.end[row]), self._handle(shard))
        try:
            meta = read_meta(parts)
            rejected = meta.get("rejected")
            if not isinstance(rejected, str) or not rejected.strip():
                raise SampleError("no_rejected_answer")
            turns, system = self.dialogue(meta, parts, index.kind_of(row), index.source_of(row))
            # The same prompt and system turn as the chosen answer, the last answer swapped.
            turns[-1] = (turns[-1][0], rejected)
            ids, mask, _ = self.encode(turns, system)
        except SampleError as exc:
            exc.where = (shard, key)
            raise
        sample["rejected_ids"], sample["rejected_mask"] = ids, mask
        return sample


class _PairCollate(BatchCollate):
    """The chosen answers as an ordinary batch, plus the rejected answers' padded tensors."""

    def __call__(self, items: list) -> tuple[dict, list]:
        samples = [s for s, _ in items if s is not None]
        events = [e for _, ev in items for e in ev]
        batch = collate(samples, self.pad_id, self.pixel_stats, self.raw_frames, self.static)
        length = max((len(s["rejected_ids"]) for s in samples), default=0)
        if self.static is not None:
            length = bucket(length, self.static.max_text)
        ids = torch.full((len(samples), length), self.pad_id, dtype=torch.long)
        attention = torch.zeros(len(samples), length, dtype=torch.long)
        targets = torch.zeros(len(samples), length, dtype=torch.bool)
        for b, s in enumerate(samples):
            n = len(s["rejected_ids"])
            ids[b, :n] = torch.tensor(s["rejected_ids"], dtype=torch.long)
            attention[b, :n] = 1
            targets[b, :n] = torch.tensor(s["rejected_mask"], dtype=torch.bool)
        batch.update(zip(REJECTED_KEYS, (ids, attention, targets)))
        return batch, events


class PreferenceLoader(Loader):
    collate_type = _PairCollate


def build_preference_loader(
    cfg: Any,
    spec: str,
    tokenizer: Any,
    *,
    what: str = "data.train",
    rank: int = 0,
    world_size: int = 1,
    train: bool = True,
    batch_size: int | None = None,
    max_samples: int | None = None,
    pin_memory: bool = False,
) -> PreferenceLoader:
    """Like `fvlm.data.loader.build_loader`, over the preference pairs at `spec` (a path spec)."""
    d = cfg.data
    index = load_index(spec, what)
    if not len(index):
        raise UsageError(f"{what}: no usable preference pairs in {spec} (run `fvlm data inspect` on it)")
    schedule = TrainSchedule(index, source_probabilities(index, d.mix, d.text_ratio), cfg.data_seed) if train else None
    reader = PreferenceReader(
        index,
        tokenizer,
        image_size=cfg.model.image_size,
        stage=cfg.train.stage,
        max_text_tokens=d.max_text_tokens,
        max_frames=d.max_frames,
        fps=d.fps,
        replicate_image_frames=d.replicate_image_frames,
        system_prompt=d.system_prompt,
    )
    if batch_size is None:
        batch_size = cfg.train.batch_size if train else cfg.train.eval_batch_size
    return PreferenceLoader(
        reader,
        train=train,
        batch_size=batch_size,
        seed=cfg.data_seed,
        rank=rank,
        world_size=world_size,
        num_workers=d.num_workers,
        max_batch_frames=d.max_batch_frames,
        schedule=schedule,
        max_samples=max_samples,
        pad_id=tokenizer.pad_token_id,
        pixel_stats=spec_pixel_stats(cfg.model.dino),
        pin_memory=pin_memory,
        static=static_shapes(cfg) if train else None,
    )


# ----------------------------------------------------------------------------- training


@dataclass
class DPOTally(StepTally):
    """StepTally plus the pair statistics of the step (sums over pairs)."""

    pairs: float = 0.0
    chosen_logp_sum: float = 0.0
    rejected_logp_sum: float = 0.0
    margin_sum: float = 0.0
    correct: float = 0.0
    nll_sum: float = 0.0  # the chosen answers' mean per-token NLLs


def load_reference(cfg: Any, device: torch.device) -> VLMBase:
    """The frozen reference: the model of train.init_from, in eval mode, no parameter trainable."""
    folder = ckpt.resolve_weights(cfg.train.init_from)
    reference = build_model(cfg.model)
    load_init_weights(reference, folder)
    reference.requires_grad_(False)
    return reference.to(device).eval()


class DPOTrainer(Trainer):
    extra_step_columns = DPO_COLUMNS

    def _setup(self) -> None:
        if self.dist.enabled:
            # The pair losses come from the model's own passes (visual_blocks, loss_over), not from
            # its forward, so DDP's hooks would never sum the gradients over ranks.
            raise UsageError("train.dpo runs in one process (no torchrun / --nproc) for now")
        super()._setup()
        self.reference = load_reference(self.cfg, self.dist.device)

    def _train_loader(self) -> Any:
        spec = split_path(self.cfg, "train")
        return build_preference_loader(
            self.cfg,
            spec,
            self.tokenizer,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            pin_memory=self.dist.device.type == "cuda",
        )

    def _forward_backward(self, micro: list, compute_coarse: bool) -> StepTally:
        dpo = self.cfg.train.dpo
        tally = DPOTally()
        for batch in micro:
            pairs = batch["input_ids"].shape[0]
            tally.samples += pairs
            tally.frames += int(batch["frame_mask"].sum())
            tally.text_tokens += int(batch["attention_mask"].sum()) + int(batch["rejected_attention_mask"].sum())
            if tally.out_of_memory:
                continue  # keep pulling this step's batches so every rank's data stream stays in step
            try:
                batch = to_device(batch, self.dist.device)
                with self.autocast():
                    with torch.no_grad():
                        ref_chosen, ref_rejected = sequence_logps(self.reference, batch)
                    chosen, rejected, chosen_tokens = pair_logps(self.model, batch)
                    losses, chosen_reward, rejected_reward = dpo_loss(
                        chosen.float(),
                        rejected.float(),
                        ref_chosen.float(),
                        ref_rejected.float(),
                        dpo.beta,
                        dpo.loss,
                        dpo.label_smoothing,
                    )
                    losses, nll = with_sft_term(losses, chosen.float(), chosen_tokens, dpo.sft_weight)
                losses.sum().backward()
                if self.masters is not None:
                    self.masters.accumulate_grads()  # train.precision=bf16: into the fp32 masters
            except torch.cuda.OutOfMemoryError:
                self._zero_grad()
                torch.cuda.empty_cache()
                tally.out_of_memory = 1.0
                continue
            margins = chosen_reward - rejected_reward
            tally.tokens += pairs
            tally.pairs += pairs
            tally.loss_sum += float(losses.detach().sum())
            tally.chosen_logp_sum += float(chosen.detach().sum())
            tally.rejected_logp_sum += float(rejected.detach().sum())
            tally.margin_sum += float(margins.sum())
            tally.correct += float((margins > 0).sum())
            tally.nll_sum += float(nll.sum())
        return tally

    def _step_extras(self, tally: StepTally) -> dict[str, float | None]:
        assert isinstance(tally, DPOTally)  # made by this class's _forward_backward
        n = tally.pairs
        values = (tally.chosen_logp_sum, tally.rejected_logp_sum, tally.margin_sum, tally.correct, tally.nll_sum)
        return {c: (v / n if n else None) for c, v in zip(DPO_COLUMNS, values)}

    def _flops_per_sample(self) -> float | None:
        """About a pair's training FLOPs: both answers' forward and backward through the policy and
        their forward through the reference, each answer counted as a whole sequence (the shared
        visual block is counted twice: an upper bound), i.e. 2 x (1 + 1/3) of one sequence's."""
        if not self.samples_seen:
            return None
        frames = self.seen["frames"] / self.samples_seen
        text = self.seen["text_tokens"] / self.samples_seen / 2
        return 2 * (4 / 3) * estimate_flops(self.cfg.model, frames=frames, text_tokens=text).per_sample


# ----------------------------------------------------------------------------- held-out margins


@torch.no_grad()
def preference_rewards(
    policy: VLMBase, reference: VLMBase, loader: Any, beta: float, device: torch.device | str = "cpu"
) -> dict[str, np.ndarray]:
    """Per held-out pair: the chosen and rejected implicit rewards of `policy` against `reference`
    (both in eval mode, in the policy's default mode) and their margin."""
    was_training = policy.training
    policy.eval()
    out: dict[str, list[np.ndarray]] = {"chosen": [], "rejected": []}
    for batch in loader:
        batch = to_device(batch, torch.device(device))
        ref_chosen, ref_rejected = sequence_logps(reference, batch, policy.default_mode)
        chosen, rejected = sequence_logps(policy, batch)
        out["chosen"].append((beta * (chosen - ref_chosen)).double().cpu().numpy())
        out["rejected"].append((beta * (rejected - ref_rejected)).double().cpu().numpy())
    policy.train(was_training)
    chosen_all = np.concatenate(out["chosen"]) if out["chosen"] else np.zeros(0)
    rejected_all = np.concatenate(out["rejected"]) if out["rejected"] else np.zeros(0)
    return {"chosen": chosen_all, "rejected": rejected_all, "margin": chosen_all - rejected_all}


def mean_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, list[float]]:
    """The mean and its t interval (NaN where there are too few values)."""
    n = len(values)
    mean = float(np.mean(values)) if n else math.nan
    interval = [math.nan, math.nan]
    if n >= 2:
        sem = float(np.std(values, ddof=1)) / math.sqrt(n)
        half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sem
        interval = [mean - half, mean + half]
    return mean, interval


def margin_summary(margins: np.ndarray, confidence: float = 0.95) -> dict[str, Any]:
    """Mean reward margin over held-out pairs with a t interval, and the reward accuracy."""
    n = len(margins)
    mean, interval = mean_interval(margins, confidence)
    return {
        "n": n,
        "mean_margin": mean,
        "ci95": interval,
        "reward_accuracy": float(np.mean(margins > 0)) if n else math.nan,
    }


def reward_summary(rewards: dict[str, np.ndarray]) -> dict[str, Any]:
    """`margin_summary` of `preference_rewards`' margins, plus the mean chosen and rejected rewards
    with t intervals: a negative chosen reward means the chosen answers became less likely than
    under the reference (the margin then grew only by pushing the rejected ones down faster)."""
    out = margin_summary(rewards["margin"])
    for key in ("chosen", "rejected"):
        mean, interval = mean_interval(rewards[key])
        out[f"mean_{key}_reward"], out[f"{key}_ci95"] = mean, interval
    return out
