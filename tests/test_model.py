"""The foveated model and its baselines on tiny random backbones."""

import pytest
import torch
from conftest import assert_same_grads_then_clear, eager_and_compiled

from fvlm.config import load_config
from fvlm.model.batch_index import build_indices
from fvlm.model.build import build_model, compile_model, load_model, save_model
from fvlm.model.encoder import query_attention
from fvlm.training.engine import target_tokens

S = 64  # tiny image size; DINO patch 8 -> 8x8 grid


def make_batch(b=2, t=4, length=12, valid=(4, 2), seed=0, indices=False):
    g = torch.Generator().manual_seed(seed)
    frame_mask = torch.zeros(b, t, dtype=torch.bool)
    for i, n in enumerate(valid):
        frame_mask[i, :n] = True
    attention_mask = torch.ones(b, length, dtype=torch.long)
    attention_mask[-1, length - 3 :] = 0
    batch = {
        "frames": torch.randn(b, t, 3, S, S, generator=g),
        "frame_mask": frame_mask,
        "input_ids": torch.randint(4, 260, (b, length), generator=g),
        "attention_mask": attention_mask,
        "loss_mask": attention_mask.bool(),
    }
    if indices:  # as the loader's collate builds them on the host
        batch.update(build_indices(frame_mask, batch["loss_mask"]))
    return batch


def tiny(*overrides):
    torch.manual_seed(0)
    cfg = load_config(None, list(overrides))
    model = build_model(cfg.model)
    model.eval()
    return model


def test_cached_deep_query_equals_full_dino_with_query_token():
    model = tiny()
    enc = model.encoder
    pixels = torch.randn(3, 3, S, S)
    query = torch.randn(3, enc.hidden_size)
    cache = enc.encode_patches(pixels)
    token, weights = enc.deep_query(cache, query)

    # Reference: every DINO layer on [CLS, patches, query], the query hidden from every token
    # (patches must not see it; it reads the patches' K/V only).
    hidden = torch.cat([enc.dino.embeddings(pixels), query[:, None]], dim=1)
    n = hidden.shape[1]
    mask = torch.zeros(1, 1, n, n)
    mask[..., -1] = float("-inf")
    for layer in enc.dino.encoder.layer:
        hidden = layer(hidden, attention_mask=mask)
    reference = enc.dino.layernorm(hidden)
    assert torch.allclose(token, reference[:, -1], atol=1e-5)
    # The query changes nothing about the patch features: they equal DINO's own forward.
    plain = enc.dino(pixel_values=pixels).last_hidden_state
    assert torch.allclose(reference[:, :-1], plain, atol=1e-5)
    assert torch.allclose(cache.features, plain, atol=1e-5)
    assert weights.shape == (3, enc.num_layers, enc.num_heads, n - 1)
    assert torch.allclose(weights.sum(-1), torch.ones(()), atol=1e-5)


def test_query_attention_matches_sdpa():
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 4, 9, 8), torch.randn(2, 4, 9, 8)
    out, _ = query_attention(q, k, v)
    assert torch.allclose(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-6)


@pytest.mark.parametrize("overrides", [(), ("model.deep_query=false",)])
def test_a_training_step_skips_the_query_weights_and_computes_the_same_losses(overrides):
    """A training step never reads the query's attention weights, so its reads run fused without
    them; asking for them (as evaluation and the pictures do) changes no loss and no gradient."""
    model = tiny("model.query_init=random", *overrides)
    model.train()
    batch = make_batch(indices=True)
    plain = model(batch, compute_coarse=True)
    assert plain.entropy_weights is None and plain.attention == {}
    plain_grads = _grads(model, plain.loss)
    asked = model(batch, compute_coarse=True, return_attention=True)
    assert set(asked.attention) == {"coarse", "fine"} and asked.attention_entropy is not None
    asked_grads = _grads(model, asked.loss)
    assert torch.allclose(plain.loss, asked.loss, atol=1e-6)
    assert torch.allclose(plain.loss_coarse, asked.loss_coarse, atol=1e-6)
    for name, grad in plain_grads.items():
        assert torch.allclose(grad, asked_grads[name], atol=1e-6), name
    model.eval()
    with torch.no_grad():
        assert model(batch).attention_entropy is not None  # evaluation reads the entropy


def test_dino_runs_once_per_frame_in_coarse_fine():
    model = tiny()
    batch = make_batch(valid=(4, 2))
    model.encoder.frames_encoded = 0
    model(batch, mode="coarse_fine").loss.backward()
    assert model.encoder.frames_encoded == 6  # valid frames only, once, shared by both passes


def test_a_compiled_model_trains_step_after_step_without_recompiling():
    """train.compile: dynamo must capture the training step once and reuse it on every later step. A
    frame counter or a float entropy in the forward made it recompile every step until it gave up
    and ran eagerly. The backend here only counts the graphs it is given and runs them as they are
    (inductor would get the same graphs, and take minutes of C++ to build them)."""
    eager, compiled, graphs = eager_and_compiled(tiny().train())
    per_step = []
    for step in range(3):
        batch = make_batch(seed=step, indices=True)  # new frames and text every step, the same shapes
        outs = [model(batch) for model in (eager, compiled)]
        for out in outs:
            out.loss.backward()
        per_step.append(len(graphs))
        assert torch.equal(outs[0].loss, outs[1].loss)
        assert outs[0].attention_entropy == pytest.approx(outs[1].attention_entropy)
        assert_same_grads_then_clear(eager, compiled)
    torch._dynamo.reset()
    # One graph for the whole step: the batch's host-built indices leave nothing data-dependent in it.
    # It was 12 graphs per step before they were traced, then 2 (a branch on the frame count).
    assert per_step == [1, 1, 1], per_step


@pytest.mark.slow
def test_batches_with_more_or_fewer_frames_per_sample_share_the_compiled_step():
    """The frames per sample (the batch's longest video) change from batch to batch, and the model
    marks that size dynamic too: every batch of 3 frames or more runs one graph (2 and 1 frames get
    their own: the LLM reads T - 1 hidden states, and dynamo specialises sizes 0 and 1). Unmarked,
    the first batch's frame count got a graph of its own and the next count a second, dynamic one:
    a compile more per mode, 35-45 s on a CPU core for the tiny model. Losses and gradients stay
    eager's."""
    from fvlm.model.batch_index import random_padded_batch

    eager, compiled, graphs = eager_and_compiled(tiny().train())
    g = torch.Generator().manual_seed(0)
    frames, counts = (4, 3, 5, 2, 6, 1), []
    for t in frames:
        batch = random_padded_batch(g, 3, t, 24, S)
        outs = [model(batch) for model in (eager, compiled)]
        for out in outs:
            out.loss.backward()
        torch.testing.assert_close(outs[0].loss, outs[1].loss)
        assert_same_grads_then_clear(eager, compiled, atol=1e-5)
        counts.append(len(graphs))
    torch._dynamo.reset()
    assert counts == [1, 1, 1, 2, 2, 3], list(zip(frames, counts))


@pytest.mark.slow
def test_every_variant_of_the_step_compiles_in_one_run():
    """A compiled run meets, in one process: training steps with and without the logged steps' coarse
    loss, batches of 3+, 2, 1 and no frames per sample, evaluation, the attention probe. Each is a
    graph of the one function `_forward`, more than dynamo's default limit of 8, at which fullgraph
    raises: the run used to fail at the ninth variant it met."""
    from fvlm.model.batch_index import random_padded_batch

    _, compiled, graphs = eager_and_compiled(tiny().train())
    g = torch.Generator().manual_seed(0)

    def batch(b, t):
        out = random_padded_batch(g, b, max(t, 1), 24, S)
        if t == 0:  # text only
            out["frames"], out["frame_mask"] = out["frames"][:, :0], out["frame_mask"][:, :0]
            out.update(build_indices(out["frame_mask"], out["loss_mask"]))
        return out

    for coarse in (False, True):
        for t in (4, 5, 2, 1, 0):
            compiled(batch(3, t), compute_coarse=coarse).loss.backward()
    compiled.eval()
    with torch.no_grad():
        for b in (16, 5):
            compiled(batch(b, 4), compute_coarse=True)
        out = compiled(batch(4, 4), return_attention=True)
    torch._dynamo.reset()
    assert out.attention and len(graphs) == 9  # T >= 3, 2, 1 per training mode, text once, eval, probe


@pytest.mark.slow
def test_a_compiled_step_through_aot_autograd_matches_eager():
    """compile_model traces the data-dependent gathers (valid frames, answer tokens) into the graph;
    AOT autograd must then derive a backward that gives eager's gradients, also when the number of
    valid frames and the text length change between steps (inductor gets these same joint graphs)."""
    import copy

    import torch._dynamo

    eager = tiny().train()
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    compile_model(compiled, backend="aot_eager")
    batches = [make_batch(seed=0), make_batch(valid=(3, 3), seed=1), make_batch(length=16, valid=(4, 1), seed=2)]
    batches += [make_batch(seed=3, indices=True), make_batch(length=16, valid=(4, 1), seed=4, indices=True)]
    for batch in batches:
        outs = [model(batch) for model in (eager, compiled)]
        for out in outs:
            out.loss.backward()
        assert outs[0].n_tokens == outs[1].n_tokens
        assert torch.allclose(outs[0].loss, outs[1].loss, atol=1e-6)
        for a, b in zip(eager.parameters(), compiled.parameters()):
            if a.grad is not None:
                assert torch.allclose(a.grad, b.grad, atol=1e-6)
                a.grad = b.grad = None
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "arch_overrides", [[], ["model.deep_query=false"], ["model.arch=multi_token"], ["model.lambda_coarse=0.5"]]
)
def test_padded_frames_do_not_change_losses(arch_overrides):
    model = tiny(*arch_overrides)
    batch = make_batch(t=4, valid=(4, 2))
    padded = dict(batch)
    extra = torch.randn(2, 3, 3, S, S)
    padded["frames"] = torch.cat([batch["frames"], extra], dim=1)
    padded["frame_mask"] = torch.cat([batch["frame_mask"], torch.zeros(2, 3, dtype=torch.bool)], dim=1)
    modes = (
        ["coarse_only"] if "multi_token" in str(arch_overrides) else ["coarse_fine", "coarse_only", "autoregressive"]
    )
    for mode in modes:
        a, b = model(batch, mode=mode), model(padded, mode=mode)
        assert torch.allclose(a.loss, b.loss, atol=1e-5), mode
        if a.loss_coarse is not None:
            assert torch.allclose(a.loss_coarse, b.loss_coarse, atol=1e-5), mode


def _masked_llm(model, embeds, mask):
    """The LLM over [B, L] rows with padding anywhere, given the 2D padding mask: transformers builds
    its own SDPA mask (what the uncached passes ran before they were packed)."""
    from fvlm.model.vlm import _positions

    return model.llm.model(
        inputs_embeds=embeds, attention_mask=mask.long(), position_ids=_positions(mask)
    ).last_hidden_state


def test_packed_llm_pass_equals_the_masked_pass_with_its_gradients():
    """Rows padded in the middle (padded frames before the text) and at the end: packing the real
    tokens to the front and running without a mask gives every real position the masked pass's
    hidden state, and the same gradients; padded inputs get none."""
    model = tiny()
    assert model.packed_attention
    g = torch.Generator().manual_seed(3)
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 1, 0], [1, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0]])
    embeds = torch.randn(3, 8, model.llm_dim, generator=g)
    weights = torch.randn(3, 8, model.llm_dim, generator=g) * mask[..., None]
    outs, grads = [], []
    for run in (lambda e: model.run_llm(e, mask), lambda e: _masked_llm(model, e, mask)):
        e = embeds.clone().requires_grad_(True)
        hidden = run(e)
        (hidden * weights).sum().backward()
        outs.append(hidden * mask[..., None])
        grads.append(e.grad)
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)
    assert torch.count_nonzero(grads[0][mask == 0]) == 0


def test_uncached_passes_call_sdpa_without_a_mask_and_cached_ones_as_transformers_does(monkeypatch):
    """A training step's LLM passes give SDPA no mask (causal, grouped-query heads natively: no
    key/value copies); a cached pass gets the mask transformers' plain SDPA model builds."""
    import torch.nn.functional as F

    model = tiny("model.query_init=random")
    model.train()
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        calls.append((q.shape[1], k.shape[1], attn_mask is None, kwargs.get("is_causal"), kwargs.get("enable_gqa")))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    batch = make_batch(indices=True)
    model(batch, compute_coarse=False).loss.backward()
    heads, kv_heads = model.llm.config.num_attention_heads, model.llm.config.num_key_value_heads
    assert kv_heads < heads
    llm_calls = [c for c in calls if c[:2] == (heads, kv_heads)]
    assert len(llm_calls) == 2 * model.llm.config.num_hidden_layers  # the coarse and the fine pass
    assert all(c[2:] == (True, True, True) for c in llm_calls)
    calls.clear()
    model.eval()
    with torch.no_grad():
        model.generate(batch, max_new_tokens=2)
    assert any(not c[2] for c in calls)  # the cached prefill of the padded prompts is masked


def test_the_llm_called_directly_with_a_padding_mask_still_masks():
    """Under fvlm's attention name, a 2D padding mask given to the LLM itself (transformers' own
    generate, a user's call) is honoured as plain SDPA honours it: left padding changes nothing."""
    model = tiny()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(4, 260, (1, 6), generator=g)
    padded = torch.cat([torch.full((1, 3), model.llm.config.pad_token_id), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = model.llm(ids).logits[:, -1]
        left_padded = model.llm(padded, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0)).logits[
            :, -1
        ]
    assert torch.allclose(alone, left_padded, atol=1e-5)


def test_the_llms_norms_are_torch_rms_norm_with_the_same_weights_and_values():
    """The LLM's RMSNorms are PyTorch's (one fused kernel each way on a GPU) over the very weight
    Parameters transformers made: same names in the state dict, same values as transformers' norm
    (bit for bit in fp32, within one bf16 rounding in bf16), same gradients."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    model = tiny()
    norms = [m for m in model.llm.modules() if isinstance(m, torch.nn.RMSNorm)]
    assert len(norms) == 2 * model.llm.config.num_hidden_layers + 1
    assert not any(isinstance(m, LlamaRMSNorm) for m in model.llm.modules())
    names = {n for n, _ in model.llm.named_parameters()}
    assert {"model.layers.0.input_layernorm.weight", "model.norm.weight"} <= names
    g = torch.Generator().manual_seed(0)
    for dtype, atol in ((torch.float32, 1e-6), (torch.bfloat16, 2e-2)):
        norm = norms[0].to(dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) + 0.5)
        reference = LlamaRMSNorm(norm.weight.shape[0], eps=norm.eps).to(dtype)
        reference.weight = norm.weight
        x = (torch.randn(3, 5, norm.weight.shape[0], generator=g) * 3).to(dtype)
        ours, theirs = norm(x.clone().requires_grad_()), reference(x.clone().requires_grad_())
        assert torch.allclose(ours.float(), theirs.float(), atol=atol, rtol=atol)
        if dtype == torch.float32:
            assert torch.equal(ours, theirs)
        grad_ours = torch.autograd.grad(ours.sum(), norm.weight)[0]
        grad_theirs = torch.autograd.grad(theirs.sum(), reference.weight)[0]
        assert torch.allclose(grad_ours.float(), grad_theirs.float(), atol=atol * 30, rtol=atol)


def _llama_reference(fused_attention):
    """transformers' own LlamaAttention over the same weights as `fused_attention`."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    reference = LlamaAttention(fused_attention.config, fused_attention.layer_idx)
    reference.load_state_dict(fused_attention.state_dict())
    return reference


def test_the_llms_attention_is_fused_over_the_same_weights_with_transformers_values_and_gradients():
    """Each LLM layer's q, k and v come from one product and its rotary runs over q and k at once
    (fvlm/model/fused.py): the state dict keeps transformers' names, and outputs and gradients match
    transformers' own attention over the same weights, with and without a cache, and under autocast
    (where the fused layer runs transformers' forward itself)."""
    from transformers import DynamicCache

    from fvlm.model.fused import FusedLlamaAttention

    model = tiny()
    llm = model.llm
    layers = [m for m in llm.modules() if isinstance(m, FusedLlamaAttention)]
    assert len(layers) == llm.config.num_hidden_layers
    assert {f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkvo"} <= set(llm.state_dict())
    ours = layers[0]
    theirs = _llama_reference(ours)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, llm.config.hidden_size, generator=g)
    positions = torch.arange(7).expand(2, 7)
    rotary = llm.model.rotary_emb(x, positions)

    def run(layer, x, rotary, cache=None):
        return layer(x, position_embeddings=rotary, attention_mask=None, cache=cache)[0]

    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ours, out_theirs = run(ours, a, rotary), run(theirs, b, rotary)
    assert torch.allclose(out_ours, out_theirs, atol=1e-6)
    out_ours.square().sum().backward()
    out_theirs.square().sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-5)
    for name, p in ours.named_parameters():
        assert torch.allclose(p.grad, theirs.get_parameter(name).grad, atol=1e-5), name

    with torch.no_grad():  # a cached continuation (generation's path): the cache holds the same keys
        caches = DynamicCache(config=llm.config), DynamicCache(config=llm.config)
        head = (x[:, :5], llm.model.rotary_emb(x, positions[:, :5]))
        tail = (x[:, 5:], llm.model.rotary_emb(x, positions[:, 5:]))
        for layer, cache in zip((ours, theirs), caches, strict=True):
            run(layer, *head, cache=cache)
        assert torch.allclose(run(ours, *tail, cache=caches[0]), run(theirs, *tail, cache=caches[1]), atol=1e-6)
        assert torch.allclose(caches[0].layers[0].keys, caches[1].layers[0].keys, atol=1e-6)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(run(ours, x, rotary), run(theirs, x, rotary))


def test_the_rotary_over_queries_and_keys_is_transformers_bit_for_bit():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from fvlm.model.fused import _rotary

    model = tiny()
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(2, 4, 9, 16, generator=g).to(dtype)  # [B, heads, L, d], as transformers has them
        k = torch.randn(2, 2, 9, 16, generator=g).to(dtype)
        cos, sin = model.llm.model.rotary_emb(q, torch.arange(3, 12).expand(2, 9))
        expected_q, expected_k = apply_rotary_pos_emb(q, k, cos.to(dtype), sin.to(dtype))
        joint = _rotary(torch.cat([q, k], dim=1).transpose(1, 2), cos.to(dtype), sin.to(dtype)).transpose(1, 2)
        assert torch.equal(joint[:, :4], expected_q) and torch.equal(joint[:, 4:], expected_k)


def test_linears_is_the_layers_one_by_one():
    """`linears` (one product over joined weights) gives each layer's output and gradients."""
    from fvlm.model.fused import linears

    torch.manual_seed(0)
    for bias in (True, False):
        layers = [torch.nn.Linear(8, n, bias=bias) for n in (8, 4, 4)]
        x = torch.randn(3, 5, 8)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        joined = linears(a, *layers)
        for out, layer in zip(joined, layers, strict=True):
            assert torch.allclose(out, layer(x), atol=1e-6)
        sum(o.square().sum() * (i + 1) for i, o in enumerate(joined)).backward()
        grads = [p.grad.clone() for layer in layers for p in layer.parameters()]
        for layer in layers:
            layer.zero_grad()
        sum(layer(b).square().sum() * (i + 1) for i, layer in enumerate(layers)).backward()
        assert torch.allclose(a.grad, b.grad, atol=1e-5)
        for grad, p in zip(grads, (p for layer in layers for p in layer.parameters()), strict=True):
            assert torch.allclose(grad, p.grad, atol=1e-5)
    with pytest.raises(ValueError, match="every layer has a bias or none"):
        linears(x, torch.nn.Linear(8, 4), torch.nn.Linear(8, 4, bias=False))


def test_single_sample_loss_equals_batched():
    model = tiny()
    batch = make_batch(valid=(4, 2))
    alone = {k: v[1:] for k, v in batch.items()}
    alone["frames"], alone["frame_mask"] = alone["frames"][:, :2], alone["frame_mask"][:, :2]
    both = model(batch, mode="coarse_fine")
    one = model(alone, mode="coarse_fine")
    # Token-mean over the batch: recombine from per-sample means weighted by token counts.
    first = model({k: v[:1] for k, v in batch.items()}, mode="coarse_fine")
    combined = (first.loss * first.n_tokens + one.loss * one.n_tokens) / (first.n_tokens + one.n_tokens)
    assert torch.allclose(both.loss, combined, atol=1e-5)


def _full_sequence_step(model, batch):
    """The coarse pass as one LLM pass over [coarse tokens + text] with gradient: what training ran
    under gradient checkpointing before it learnt to take gradient through the visual tokens only."""
    frame_mask = batch["frame_mask"]
    prepared = model._prepare(batch["frames"], frame_mask)
    coarse, _ = model._coarse(prepared, frame_mask)
    embeds = torch.cat([coarse, model.embed_text(batch["input_ids"])], dim=1)
    mask = torch.cat([frame_mask.long(), batch["attention_mask"].long()], dim=1)
    hidden = model.run_llm(embeds, mask)
    loss_coarse, _ = model.text_loss(hidden, mask, batch["input_ids"], batch["loss_mask"])
    fine_tokens, _ = model._read(*prepared, model._next_queries(hidden[:, : frame_mask.shape[1]], frame_mask))
    loss_fine, _ = model.loss_over(model._scatter(fine_tokens, frame_mask), frame_mask, batch)
    return loss_fine, loss_coarse


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_checkpointed_training_step_equals_plain_and_full_sequence(lam):
    """Training with gradient checkpointing gives the losses and gradients of training without it,
    and of the full-sequence coarse pass, whether or not the coarse loss is trained."""
    model = tiny(f"model.lambda_coarse={lam}", "model.query_init=random")
    model.train()
    batch = make_batch()
    plain = model(batch, mode="coarse_fine", compute_coarse=True)
    plain_grads = _grads(model, plain.loss)
    loss_fine, loss_coarse = _full_sequence_step(model, batch)
    full_grads = _grads(model, loss_fine + lam * loss_coarse)
    same_weights = tiny(f"model.lambda_coarse={lam}", "model.query_init=random", "model.gradient_checkpointing=true")
    same_weights.train()
    checkpointed = same_weights(batch, mode="coarse_fine", compute_coarse=True)
    checkpointed_grads = _grads(same_weights, checkpointed.loss)
    for out in (checkpointed, plain):
        assert torch.allclose(out.loss_fine, loss_fine, atol=1e-5)
        assert torch.allclose(out.loss_coarse, loss_coarse, atol=1e-5)
    assert plain_grads.keys() == full_grads.keys() == checkpointed_grads.keys()
    for name, grad in full_grads.items():
        assert torch.allclose(plain_grads[name], grad, atol=1e-5), name
        assert torch.allclose(checkpointed_grads[name], grad, atol=1e-5), name
    # The query-reading parameters do get gradient through the coarse states.
    assert checkpointed_grads["llm_to_query.weight"].abs().sum() > 0


def test_coarse_loss_without_gradient_equals_coarse_only_mode():
    model = tiny()
    batch = make_batch()
    out = model(batch, mode="coarse_fine")
    assert torch.allclose(out.loss_coarse, model(batch, mode="coarse_only").loss, atol=1e-5)


def test_loss_combines_fine_and_weighted_coarse():
    # Random queries: with the CLS start the fine and coarse passes are the same pass at init.
    model = tiny("model.lambda_coarse=0.5", "model.query_init=random")
    out = model(make_batch(), mode="coarse_fine")
    assert torch.allclose(out.loss, out.loss_fine + 0.5 * out.loss_coarse, atol=1e-6)
    assert out.loss_coarse.item() > 0 and out.loss_coarse.item() != out.loss_fine.item()


def test_cls_start_makes_every_query_dinos_own_cls_token():
    """query_init=cls: before training, the coarse and the fine tokens are DINO's final CLS feature of
    each frame (projected), in every mode."""
    model = tiny()
    batch = make_batch()
    valid = batch["frames"][batch["frame_mask"]]
    with torch.no_grad():
        cls = model.encoder.dino(pixel_values=valid).last_hidden_state[:, 0]
        expected = model.project(cls)
        blocks = model.visual_blocks(batch, ("coarse_only", "coarse_fine", "autoregressive"))
    for mode, (tokens, mask, _) in blocks.items():
        assert torch.allclose(tokens[mask], expected, atol=1e-5), mode


def test_autoregressive_cache_equals_recompute_and_starts_from_q_init():
    model = tiny()
    batch = make_batch(valid=(4, 3))
    prepared = model._prepare(batch["frames"], batch["frame_mask"])
    cached, w_cached = model._sequential_fine(batch["frame_mask"], prepared, use_cache=True)
    full, w_full = model._sequential_fine(batch["frame_mask"], prepared, use_cache=False)
    assert torch.allclose(cached, full, atol=1e-5)
    assert torch.allclose(w_cached, w_full, atol=1e-5)
    # The first frame is read with q_init.
    cache, kv = prepared
    first, _ = model._read(cache.select(torch.tensor([0, 4])), kv, model.q_init.expand(2, -1))
    assert torch.allclose(cached[:, 0], first, atol=1e-6)


def test_generation_with_cache_equals_without():
    model = tiny()
    batch = make_batch(valid=(4, 2))
    for mode in ("coarse_only", "coarse_fine", "autoregressive"):
        with_cache = model.generate(batch, mode=mode, max_new_tokens=6, use_cache=True)
        without = model.generate(batch, mode=mode, max_new_tokens=6, use_cache=False)
        assert torch.equal(with_cache, without), mode


def test_text_only_batch_and_mixed_batch():
    model = tiny()
    batch = make_batch(valid=(0, 0))
    out = model(batch)
    assert torch.isfinite(out.loss)
    mixed = model(make_batch(valid=(3, 0)))
    assert torch.isfinite(mixed.loss) and mixed.n_tokens > 0


def test_no_loss_tokens_gives_zero_not_nan():
    model = tiny()
    batch = make_batch()
    batch["loss_mask"] = torch.zeros_like(batch["loss_mask"])
    out = model(batch)
    assert out.n_tokens == 0 and out.loss.item() == 0.0


@pytest.mark.parametrize("overrides", [[], ["model.arch=multi_token"], ["model.coarse_only=true"]])
def test_target_tokens_from_the_cpu_batch_equal_the_forwards_count(overrides):
    """The trainer agrees across ranks on a step's target tokens before any forward (engine.py)."""
    model = tiny(*overrides)
    for valid in [(4, 2), (3, 0), (0, 0)]:
        batch = make_batch(valid=valid, seed=sum(valid))
        batch["attention_mask"][0, :2] = 0  # padding before the text: its first real token has no predictor
        batch["loss_mask"] = batch["attention_mask"].bool() & (torch.arange(12) % 3 != 1)
        batch["loss_mask"][1, 0] = True  # the first position: counted only after a real frame
        with torch.no_grad():
            n = model(batch).n_tokens
        assert target_tokens(batch) == n > 0, valid


def _grad_names(model):
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_gradients_reach_every_connector_module():
    # Random queries: the CLS start zeroes llm_to_query's weight, which cuts the fine pass off from the
    # coarse one until its first update.
    model = tiny("model.query_init=random")
    model.train()
    model(make_batch(), mode="coarse_fine").loss.backward()
    names = _grad_names(model)
    for expected in ("q_static", "q_init", "llm_to_query.weight", "query_proj.weight", "dino_to_llm.weight"):
        assert expected in names, expected
    assert any(n.startswith("encoder.dino.") for n in names)
    assert any(n.startswith("llm.") for n in names)


def test_frozen_groups_receive_no_gradient():
    model = tiny("model.freeze_dino=true", "model.freeze_llm=true")
    model.train()
    model(make_batch(), mode="coarse_fine").loss.backward()
    for name, param in model.named_parameters():
        if name.startswith(("encoder.dino.", "llm.")):
            assert param.grad is None, name
    groups = model.param_groups()
    assert (
        groups["dino"] == [] and groups["llm"] == [] and len(groups["connector"]) == 7
    )  # q_static, q_init, query_proj, dino_to_llm (w, b), llm_to_query (w, b)


def test_param_groups_partition_trainable_parameters():
    for overrides in ([], ["model.deep_query=false"], ["model.arch=multi_token"], ["model.coarse_only=true"]):
        model = tiny(*overrides)
        groups = model.param_groups()
        ids = [id(p) for g in groups.values() for p in g]
        assert len(ids) == len(set(ids))
        assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
        backbone = {id(p) for p in model.llm.parameters()} | {id(p) for p in model.encoder.dino.parameters()}
        assert {id(p) for p in groups["connector"]}.isdisjoint(backbone)


def test_coarse_only_training_uses_every_parameter():
    model = tiny("model.coarse_only=true")
    model.train()
    out = model(make_batch())
    out.loss.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []
    assert out.loss_fine is None and not hasattr(model, "llm_to_query")


def test_multi_token_gives_k_squared_tokens_per_frame():
    for k in (1, 2, 4):
        model = tiny("model.arch=multi_token", f"model.tokens_per_frame={k * k}")
        batch = make_batch(t=3, valid=(3, 1))
        tokens, mask = model.visual_tokens(batch)
        assert tokens.shape == (2, 3 * k * k, model.llm_dim)
        assert mask.sum(1).tolist() == [3 * k * k, k * k]


def test_attention_weights_and_entropy():
    model = tiny()
    out = model(make_batch(valid=(4, 2)), return_attention=True)
    fine = out.attention["fine"]
    assert fine.shape == (2, 4, 2, 4, 65)
    assert torch.allclose(fine[0].sum(-1), torch.ones(()), atol=1e-5)
    assert fine[1, 2:].abs().sum() == 0  # padded frames
    assert 0 < out.attention_entropy <= torch.log(torch.tensor(65.0)).item() + 1e-5


def test_save_load_round_trip(tmp_path):
    from fvlm.model.tokenizer import byte_tokenizer

    for overrides in ([], ["model.arch=multi_token"]):
        model = tiny(*overrides)
        with torch.no_grad():
            model.dino_to_llm.weight.add_(0.1)  # not the init any more
        save_model(model, tmp_path / "m", byte_tokenizer())
        loaded, tok = load_model(tmp_path / "m")
        loaded.eval()
        batch = make_batch()
        assert torch.equal(model(batch).loss, loaded(batch).loss)
        assert tok("a red ball").input_ids == byte_tokenizer()("a red ball").input_ids


def test_bad_backbone_path_is_a_usage_error(tmp_path):
    from fvlm.errors import UsageError

    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="config.json"):
        build_model(load_config(None, [f"model.llm={tmp_path / 'empty'}"]).model)
    with pytest.raises(UsageError, match="neither a folder"):
        build_model(load_config(None, [f"model.dino={tmp_path / 'missing'}"]).model)
