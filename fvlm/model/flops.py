"""FLOP counting for one training sample, from the backbone shapes alone (no weights needed).

Two formulas:
- `exact`: forward + backward matmul FLOPs of what a training step really runs: DINO over all
  patches once per frame, each query through every DINO layer (or one shallow cross-attention),
  the coarse LLM pass over visual tokens only, the fine pass over visual + text, logits at target
  positions only. Backward costs follow what autograd computes: weight gradients only for trainable
  weights, input gradients only where something upstream is trainable, nothing for work done under
  no_grad (DINO's patch pass when DINO is frozen). Attention is counted dense (as torch's counter does).
  Under gradient checkpointing the backward pass runs every LLM layer's forward again; that
  recomputation is reported apart (`recompute`), because it is a memory-for-time trade and not
  compute the model's training needs: budgets and the scaling axis use `per_sample` without it, so
  turning checkpointing on does not change a cell's sample count. `executed` is what the machine
  runs, and what torch's counter measures.
- `seed`: the plan's own approximation, 2 x total params x tokens per sample, which its C1-C4
  budget table was computed with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fvlm.config import ModelConfig
from fvlm.model.backbones import backbone_config

# The plan's budget levels (docs/phase1_plan.md, "FLOP Budget Calibration").
PLAN_BUDGETS = {"C1": 1.6e16, "C2": 5.6e16, "C3": 1.6e17, "C4": 3.1e17}
# The plan's sample shape: ~500 tokens per sample (visual + text).
PLAN_FRAMES, PLAN_TEXT_TOKENS = 16, 484


@dataclass
class FlopReport:
    per_sample: float
    breakdown: dict[str, float]
    params: dict[str, int]
    tokens_per_sample: float  # a mean sample's (frames and text tokens may be means)
    formula: str
    shape: dict[str, float] = field(default_factory=dict)
    recompute: float = 0.0  # forward work gradient checkpointing repeats in the backward pass

    def samples_for(self, budget: float) -> int:
        return int(budget // self.per_sample)

    @property
    def executed(self) -> float:
        return self.per_sample + self.recompute


class _Tally:
    """Adds forward and backward FLOPs per component."""

    def __init__(self):
        self.parts: dict[str, float] = {}

    def add(self, part: str, flops: float) -> None:
        self.parts[part] = self.parts.get(part, 0.0) + flops

    def linear(self, part, n, d_in, d_out, weight_grad, input_grad, count=1):
        fwd = 2.0 * n * d_in * d_out * count
        self.add(part, fwd * (1 + int(weight_grad) + int(input_grad)))

    def attention(self, part, n_q, n_k, width, q_grad, kv_grad, count=1):
        """softmax(QK^T)V: 2 matmuls forward; backward dP if anything needs grad, dV/dK if K,V do, dQ if Q does."""
        mm = 2.0 * n_q * n_k * width * count
        backward = 0
        if q_grad or kv_grad:
            backward += 1  # dP = dO V^T
            backward += int(q_grad) + 2 * int(kv_grad)  # dQ; dK and dV
        self.add(part, mm * (2 + backward))


def _shapes(cfg: ModelConfig):
    llm = backbone_config(cfg.llm, "llm")
    dino = backbone_config(cfg.dino, "dino")
    head_dim = getattr(llm, "head_dim", None) or llm.hidden_size // llm.num_attention_heads
    return llm, dino, head_dim


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameters by part, from the configs (equals the built model's count)."""
    llm, dino, hd = _shapes(cfg)
    d, inter, v = llm.hidden_size, llm.intermediate_size, llm.vocab_size
    q_width, kv_width = llm.num_attention_heads * hd, llm.num_key_value_heads * hd
    bias = int(getattr(llm, "attention_bias", False))
    attn = d * q_width + 2 * d * kv_width + q_width * d + bias * (q_width + 2 * kv_width + d)
    mlp = 3 * d * inter + (3 * inter if getattr(llm, "mlp_bias", False) else 0)
    llm_params = v * d + llm.num_hidden_layers * (attn + mlp + 2 * d) + d
    if not llm.tie_word_embeddings:
        llm_params += d * v

    dd, p = dino.hidden_size, dino.patch_size
    hidden_mlp = int(dd * dino.mlp_ratio)
    positions = (dino.image_size // p) ** 2 + 1
    embed = 3 * p * p * dd + dd + dd + dd + positions * dd  # conv (w, b), cls, mask token, positions
    layer = 4 * dd + 4 * (dd * dd + dd) + 2 * dd + dd * hidden_mlp + hidden_mlp + hidden_mlp * dd + dd
    dino_params = embed + dino.num_hidden_layers * layer + 2 * dd

    dq = cfg.query_dim or dd
    connector = dd * d + d  # dino_to_llm
    if cfg.arch == "foveated":
        connector += dq + dq * dd  # q_static, query_proj
        if not cfg.coarse_only:
            connector += dq + d * dq + dq  # q_init, llm_to_query
        if not cfg.deep_query:
            connector += 4 * (dd * dd + dd)
    return {
        "llm": llm_params,
        "dino": dino_params,
        "connector": connector,
        "total": llm_params + dino_params + connector,
    }


def estimate_flops(
    cfg: ModelConfig,
    frames: float,
    text_tokens: float,
    loss_tokens: float | None = None,
    formula: str = "exact",
    coarse_text_loss: bool | None = None,
) -> FlopReport:
    """FLOPs of one training sample with `frames` frames and `text_tokens` text tokens (means over
    many samples are welcome: the count is then that of the mean shape).

    `loss_tokens` (default: all text tokens) sets how many positions get logits.
    `coarse_text_loss` includes the coarse text CE pass; by default it is counted only when it
    is part of the objective (lambda > 0): with lambda = 0 it is measured at logged steps only.
    """
    params = count_params(cfg)
    visual_per_frame = cfg.tokens_per_frame or 1
    tokens = frames * visual_per_frame + text_tokens
    shape = {"frames": frames, "text_tokens": text_tokens}
    if formula == "seed":
        return FlopReport(
            2.0 * params["total"] * tokens,
            {"2*N*tokens": 2.0 * params["total"] * tokens},
            params,
            tokens,
            "seed",
            shape,
        )
    if formula != "exact":
        raise ValueError(f"unknown FLOP formula {formula!r} (exact or seed)")

    llm, dino, hd = _shapes(cfg)
    loss_tokens = text_tokens if loss_tokens is None else loss_tokens
    if coarse_text_loss is None:
        coarse_text_loss = cfg.arch == "foveated" and not cfg.coarse_only and cfg.lambda_coarse > 0
    llm_train, dino_train = not cfg.freeze_llm, not cfg.freeze_dino
    d_llm, d_dino = llm.hidden_size, dino.hidden_size
    dq = cfg.query_dim or d_dino
    mlp_dino = int(d_dino * dino.mlp_ratio)
    patches = (cfg.image_size // dino.patch_size) ** 2
    seq_dino = patches + 1
    t = _Tally()

    # DINO over every patch, once per frame (no backward at all when DINO is frozen: run under no_grad).
    # The deep query reads only K/V, so the last layer stops after its K/V projections.
    def patch_pass(tally, grad):
        tally.linear("dino_patches", frames * patches, 3 * dino.patch_size**2, d_dino, grad, False)
        n = frames * seq_dino
        for layer in range(dino.num_hidden_layers):
            if cfg.arch == "foveated" and cfg.deep_query and layer == dino.num_hidden_layers - 1:
                tally.linear("dino_patches", n, d_dino, 2 * d_dino, grad, grad)
                break
            tally.linear("dino_patches", n, d_dino, 3 * d_dino, grad, grad)
            tally.attention("dino_patches", seq_dino, seq_dino, d_dino, grad, grad, count=frames)
            tally.linear("dino_patches", n, d_dino, d_dino, grad, grad)
            tally.linear("dino_patches", n, d_dino, mlp_dino, grad, grad)
            tally.linear("dino_patches", n, mlp_dino, d_dino, grad, grad)

    patch_pass(t, dino_train)

    recompute = _Tally()

    def llm_pass(part, n_q, n_k, weight_grad, input_grad):
        q_width, kv_width = llm.num_attention_heads * hd, llm.num_key_value_heads * hd
        for _ in range(llm.num_hidden_layers):
            t.linear(part, n_q, d_llm, q_width + 2 * kv_width, weight_grad, input_grad)
            t.attention(part, n_q, n_k, q_width, input_grad, input_grad)
            t.linear(part, n_q, q_width, d_llm, weight_grad, input_grad)
            t.linear(part, n_q, d_llm, 2 * llm.intermediate_size, weight_grad, input_grad)
            t.linear(part, n_q, llm.intermediate_size, d_llm, weight_grad, input_grad)
            if cfg.gradient_checkpointing and (weight_grad or input_grad):
                # A checkpointed layer keeps only its input and runs its forward again in the backward
                # pass, up to the last tensor the backward needs: torch's non-reentrant checkpoint
                # stops once the MLP's down projection has saved its input, before that product runs.
                recompute.linear(part, n_q, d_llm, q_width + 2 * kv_width, False, False)
                recompute.attention(part, n_q, n_k, q_width, False, False)
                recompute.linear(part, n_q, q_width, d_llm, False, False)
                recompute.linear(part, n_q, d_llm, 2 * llm.intermediate_size, False, False)

    def report():
        return FlopReport(
            sum(t.parts.values()), t.parts, params, tokens, "exact", shape, recompute=sum(recompute.parts.values())
        )

    def lm_head(part, n, grad=True):
        t.linear(part, n, d_llm, llm.vocab_size, llm_train and grad, grad)

    if cfg.arch == "multi_token":
        n_visual = frames * visual_per_frame
        t.linear("projection", n_visual, d_dino, d_llm, True, dino_train)
        llm_pass("llm", n_visual + text_tokens, n_visual + text_tokens, llm_train, True)
        lm_head("lm_head", loss_tokens)
        return report()

    def query_reads(part, n_frames):
        t.linear(part, n_frames, dq, d_dino, True, True)  # query_proj
        if cfg.deep_query:
            for _ in range(dino.num_hidden_layers):
                t.linear(part, n_frames, d_dino, d_dino, dino_train, True)  # q_proj
                t.attention(part, 1, seq_dino, d_dino, True, dino_train, count=n_frames)
                t.linear(part, n_frames, d_dino, d_dino, dino_train, True)  # o_proj
                t.linear(part, n_frames, d_dino, mlp_dino, dino_train, True)
                t.linear(part, n_frames, mlp_dino, d_dino, dino_train, True)
        else:
            t.linear(part, n_frames, d_dino, d_dino, True, True)  # q
            t.attention(part, 1, seq_dino, d_dino, True, True, count=n_frames)
            t.linear(part, n_frames, d_dino, d_dino, True, True)  # o
        t.linear(part, n_frames, d_dino, d_llm, True, True)  # dino_to_llm

    if not cfg.deep_query:
        t.linear("shallow_kv", frames * seq_dino, d_dino, 2 * d_dino, True, dino_train)

    query_reads("query_coarse", frames)
    if cfg.coarse_only:
        llm_pass("llm_coarse", frames + text_tokens, frames + text_tokens, llm_train, True)
        lm_head("lm_head", loss_tokens)
        return report()

    if cfg.lambda_coarse > 0:
        n = frames + text_tokens
        llm_pass("llm_coarse", n, n, llm_train, True)
        lm_head("lm_head_coarse", loss_tokens)
    else:
        llm_pass("llm_coarse", frames, frames, llm_train, True)
        if coarse_text_loss:
            # Without gradient: the text continues from the visual pass's KV cache, except under
            # checkpointing (which keeps no cache in a pass with gradient): then it reads the frames again.
            n_q = frames + text_tokens if cfg.gradient_checkpointing else text_tokens
            llm_pass("coarse_text_eval", n_q, frames + text_tokens, False, False)
            lm_head("coarse_text_eval", loss_tokens, grad=False)
    t.linear("llm_to_query", max(frames - 1, 0), d_llm, dq, True, True)
    query_reads("query_fine", frames)
    n = frames + text_tokens
    llm_pass("llm_fine", n, n, llm_train, True)
    lm_head("lm_head", loss_tokens)
    return report()


def measure_flops(
    cfg: ModelConfig, frames: int, text_tokens: int, device: str = "cpu", compute_coarse: bool = False
) -> float:
    """FLOPs that torch.utils.flop_counter counts for one real training step (forward + backward)
    on one sample of this shape, with random weights of the configured shapes. `compute_coarse`
    measures the coarse loss too, as a logged step does (estimate_flops' `coarse_text_loss`)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from fvlm.model.build import build_model

    with torch.device(device):
        model = build_model(cfg)
        image = cfg.image_size
        batch = {
            "frames": torch.randn(1, frames, 3, image, image),
            "frame_mask": torch.ones(1, frames, dtype=torch.bool),
            "input_ids": torch.randint(4, 200, (1, text_tokens)),
            "attention_mask": torch.ones(1, text_tokens, dtype=torch.long),
            "loss_mask": torch.ones(1, text_tokens, dtype=torch.bool),
        }
    model.train()
    counter = FlopCounterMode(display=False)
    # The math backend decomposes attention into matmuls the counter sees; the fused CPU kernel
    # has no FLOP formula and would count as zero.
    with counter, sdpa_kernel(SDPBackend.MATH):
        out = model(batch, compute_coarse=compute_coarse)
        out.loss.backward()
    return float(counter.get_total_flops())
