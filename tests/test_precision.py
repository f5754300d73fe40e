"""train.precision=bf16: bf16 parameters with fp32 master weights (fvlm/training/precision.py).

The trainer's own micro-batch and optimizer code (`Trainer._forward_backward`, `_optimizer_step`, run
on a stand-in `self`) against an AdamW update written out by hand on fp32 copies of the masters, from
the same bf16 gradients; and the checkpoint's weights against the masters."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from fvlm.config import load_config
from fvlm.model.build import build_model, load_model, save_model
from fvlm.training import precision as prec
from fvlm.training.dist import Dist
from fvlm.training.engine import Engine
from fvlm.training.optim import apply_lrs, build_optimizer
from fvlm.training.trainer import Trainer

LRS = {"connector": 3e-3, "dino": 3e-4, "llm": 1e-3}


def make_batch(seed: int, b: int = 2, t: int = 3, length: int = 12, size: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    loss_mask = torch.ones(b, length, dtype=torch.bool)
    loss_mask[:, : length // 2] = False
    frame_mask = torch.ones(b, t, dtype=torch.bool)
    frame_mask[1, -1] = False  # a padded frame
    return {
        "frames": torch.randn(b, t, 3, size, size, generator=g),
        "frame_mask": frame_mask,
        "input_ids": torch.randint(4, 250, (b, length), generator=g),
        "attention_mask": torch.ones(b, length, dtype=torch.long),
        "loss_mask": loss_mask,
    }


@pytest.fixture
def setup():
    torch.manual_seed(0)
    cfg = load_config("tiny", ["model.image_size=32", "train.grad_clip=0.5"])
    model = build_model(cfg.model).train()
    fp32_start = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = [p for params in model.param_groups().values() for p in params]
    masters = prec.MasterWeights(model, trainable)
    optimizer = build_optimizer(model, cfg.optim, masters)
    apply_lrs(optimizer, LRS)
    stand_in = SimpleNamespace(
        cfg=cfg,
        model=model,
        masters=masters,
        optimizer=optimizer,
        optimized=masters.masters,
        autocast=lambda: prec.autocast("bf16", torch.device("cpu")),
        dist=Dist(),
        engine=Engine(model, Dist()),
    )
    stand_in._zero_grad = lambda: Trainer._zero_grad(stand_in)  # type: ignore[arg-type]
    return stand_in, fp32_start


def manual_adamw(params, grads, state, step, group_of, cfg, clip):
    """AdamW with decoupled weight decay, written out: the reference the fused kernel must match."""
    total = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    scale = min(1.0, clip / (total + 1e-6))
    out = []
    for i, (p, g) in enumerate(zip(params, grads)):
        g = g * scale
        lr, decay = group_of[i]
        m, v = state.get(i, (torch.zeros_like(p), torch.zeros_like(p)))
        m = cfg.beta1 * m + (1 - cfg.beta1) * g
        v = cfg.beta2 * v + (1 - cfg.beta2) * g * g
        state[i] = (m, v)
        m_hat = m / (1 - cfg.beta1**step)
        v_hat = v / (1 - cfg.beta2**step)
        p = p * (1 - lr * decay)
        out.append(p - lr * m_hat / (v_hat.sqrt() + cfg.eps))
    return out, total


def test_model_runs_in_bf16_and_masters_start_at_the_fp32_weights(setup):
    stand_in, fp32_start = setup
    model, masters = stand_in.model, stand_in.masters
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(b.dtype != torch.bfloat16 for b in model.buffers())  # rotary frequencies stay fp32
    names = {id(p): n for n, p in model.named_parameters()}
    for param, master in zip(masters.params, masters.masters):
        assert master.dtype == torch.float32
        assert torch.equal(master, fp32_start[names[id(param)]])  # exact, not rounded
    out = model(make_batch(0), compute_coarse=True)
    assert out.loss.dtype == torch.float32 and math.isfinite(float(out.loss.detach()))  # CE on fp32 logits


def test_bf16_master_steps_equal_a_hand_written_fp32_adamw(setup):
    stand_in, _ = setup
    model, masters, cfg = stand_in.model, stand_in.masters, stand_in.cfg
    group_of = {}
    index = {id(m): i for i, m in enumerate(masters.masters)}
    for group in stand_in.optimizer.param_groups:
        for m in group["params"]:
            group_of[index[id(m)]] = (group["lr"], group["weight_decay"])
    assert any(decay > 0 for _, decay in group_of.values())
    expected = [m.clone() for m in masters.masters]
    state: dict = {}
    for step in (1, 2):
        micro = [make_batch(10 * step), make_batch(10 * step + 1)]
        # The reference: each micro-batch's bf16 gradients of its token-sum loss, summed in fp64.
        grads = [torch.zeros_like(m, dtype=torch.float64) for m in masters.masters]
        tokens = 0
        for batch in micro:
            out = model(batch, compute_coarse=False)
            (out.loss * out.n_tokens).backward()
            tokens += out.n_tokens
            for i, p in enumerate(masters.params):
                if p.grad is not None:
                    assert p.grad.dtype == torch.bfloat16
                    grads[i] += p.grad.double()
            model.zero_grad(set_to_none=True)
        grads = [(g / tokens).float() for g in grads]
        expected, total = manual_adamw(expected, grads, state, step, group_of, cfg.optim, cfg.train.grad_clip)
        # The trainer's path on the same model and batches.
        tally = Trainer._forward_backward(stand_in, micro, compute_coarse=False)  # type: ignore[arg-type]
        assert tally.tokens == tokens
        assert all(p.grad is None for p in masters.params)  # moved into the masters' fp32 gradients
        grad_norm = Trainer._optimizer_step(stand_in, tally.tokens)  # type: ignore[arg-type]
        assert float(grad_norm) == pytest.approx(total, rel=1e-5) and total > cfg.train.grad_clip  # clipping was active
        for i, (m, e, p) in enumerate(zip(masters.masters, expected, masters.params)):
            torch.testing.assert_close(m, e, rtol=1e-5, atol=1e-7, msg=f"master {i} at step {step}")
            assert torch.equal(p.detach(), m.to(torch.bfloat16))  # the model holds the rounded masters
        assert all(m.grad is None for m in masters.masters)


def test_checkpoint_weights_are_the_fp32_masters_and_load_back_exactly(setup, tmp_path):
    stand_in, _ = setup
    model, masters = stand_in.model, stand_in.masters
    Trainer._forward_backward(stand_in, [make_batch(3)], compute_coarse=False)  # type: ignore[arg-type]
    Trainer._optimizer_step(stand_in, 10.0)  # type: ignore[arg-type]
    # Masters now hold values that bf16 cannot: the file must keep them, not their rounding.
    assert any(not torch.equal(m, m.to(torch.bfloat16).float()) for m in masters.masters)
    with masters.fp32_view():
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        save_model(model, tmp_path)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    loaded, _ = load_model(tmp_path)
    names = {id(p): n for n, p in model.named_parameters()}
    state = dict(loaded.named_parameters())
    for param, master in zip(masters.params, masters.masters):
        assert torch.equal(state[names[id(param)]], master)
    # Loading inside the view writes the masters, and the bf16 weights follow.
    saved = [m.clone() for m in masters.masters]
    with torch.no_grad():
        for m in masters.masters:
            m.add_(1.0)
    from safetensors.torch import load_model as load_safetensors

    with masters.fp32_view():
        load_safetensors(model, str(tmp_path / "model.safetensors"))
    for m, s, p in zip(masters.masters, saved, masters.params):
        assert torch.equal(m, s) and torch.equal(p.detach(), s.to(torch.bfloat16))


def test_resolve_precision():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert prec.resolve("auto", cpu) == "fp32"
    assert prec.resolve("bf16", cpu) == "bf16"
    assert prec.resolve("bf16-autocast", cpu) == "bf16-autocast"
    if not torch.cuda.is_available():
        return
    assert prec.resolve("auto", cuda) == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
