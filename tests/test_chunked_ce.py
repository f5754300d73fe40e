"""The chunked lm_head + cross-entropy against the plain F.cross_entropy over all logits."""

import pytest
import torch
import torch.nn.functional as F
from conftest import eager_and_compiled
from test_model import make_batch, tiny

from fvlm.config import load_config
from fvlm.errors import UsageError
from fvlm.model.chunked_ce import chunked_cross_entropy


def _plain(hidden, weight, bias, labels):
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), labels, reduction="none")


def _losses_and_grads(fn, hidden, weight, bias, labels, upstream):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    h, w = leaves[0], leaves[1]
    b = leaves[2] if bias is not None else None
    losses = fn(h, w, b, labels)
    (losses * upstream).sum().backward()
    return losses.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("m,chunk", [(37, 8), (16, 16), (5, 64), (0, 4)])
def test_losses_and_gradients_equal_the_plain_cross_entropy(m, chunk, with_bias):
    g = torch.Generator().manual_seed(m + chunk)
    hidden = torch.randn(m, 24, generator=g)
    weight = torch.randn(300, 24, generator=g) * 0.3
    bias = torch.randn(300, generator=g) if with_bias else None
    labels = torch.randint(0, 300, (m,), generator=g)
    upstream = torch.rand(m, generator=g)  # unequal per-target weights, as text_loss's
    ref, ref_grads = _losses_and_grads(_plain, hidden, weight, bias, labels, upstream)
    chunked = lambda h, w, b, y: chunked_cross_entropy(h, w, b, y, chunk)  # noqa: E731
    got, got_grads = _losses_and_grads(chunked, hidden, weight, bias, labels, upstream)
    assert got.dtype == torch.float32 and got.shape == (m,)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_tied_weight_gets_the_sum_of_both_gradients():
    """The head's weight is also the embedding table: its gradient adds both uses, as unchunked."""
    g = torch.Generator().manual_seed(1)
    table = torch.randn(200, 16, generator=g) * 0.3
    ids = torch.randint(0, 200, (23,), generator=g)
    labels = torch.randint(0, 200, (23,), generator=g)
    grads = []
    for fn in (_plain, lambda h, w, b, y: chunked_cross_entropy(h, w, b, y, 7)):
        w = table.clone().requires_grad_()
        hidden = torch.tanh(F.embedding(ids, w))
        fn(hidden, w, None, labels).sum().backward()
        grads.append(w.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_bf16_inputs_give_bf16_gradients_close_to_the_plain_path():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(50, 32, generator=g).bfloat16()
    weight = (torch.randn(400, 32, generator=g) * 0.2).bfloat16()
    labels = torch.randint(0, 400, (50,), generator=g)
    upstream = torch.ones(50)
    ref, ref_grads = _losses_and_grads(_plain, hidden, weight, None, labels, upstream)
    chunked = lambda h, w, b, y: chunked_cross_entropy(h, w, b, y, 16)  # noqa: E731
    got, got_grads = _losses_and_grads(chunked, hidden, weight, None, labels, upstream)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)  # same bf16 logits, fp32 softmax
    for a, b in zip(got_grads, ref_grads):
        assert a.dtype == torch.bfloat16
        # The chunked weight gradient sums chunks in fp32, the plain one in one bf16 matmul.
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3)


def test_text_loss_with_ce_chunk_equals_the_plain_loss_and_every_gradient():
    batch = make_batch()  # 12 + 9 targets: not a multiple of 5
    results = []
    for chunk in (0, 5):
        model = tiny("model.query_init=random", f"model.ce_chunk={chunk}")
        model.train()
        out = model(batch, mode="coarse_fine", compute_coarse=True)
        model.zero_grad()
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (plain, plain_grads), (chunked, chunked_grads) = results
    assert chunked.n_tokens == plain.n_tokens
    torch.testing.assert_close(chunked.loss, plain.loss, rtol=1e-5, atol=1e-6)
    assert plain_grads.keys() == chunked_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_ce_chunk_must_not_be_negative():
    assert load_config(None, []).model.ce_chunk == 0
    with pytest.raises(UsageError, match="model.ce_chunk"):
        load_config(None, ["model.ce_chunk=-1"])


def test_text_loss_takes_the_chunked_path_only_with_ce_chunk(monkeypatch):
    import fvlm.model.vlm as vlm

    calls = []
    monkeypatch.setattr(vlm, "chunked_cross_entropy", lambda *a: calls.append(a[-1]) or chunked_cross_entropy(*a))
    batch = make_batch()
    for chunk in (0, 4):
        tiny(f"model.ce_chunk={chunk}")(batch, mode="coarse_fine")
    assert calls and set(calls) == {4}


def test_compiles_fullgraph_with_equal_losses_and_gradients():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(37, 16, generator=g)
    weight = torch.randn(100, 16, generator=g) * 0.3
    labels = torch.randint(0, 100, (37,), generator=g)
    upstream = torch.ones(37)
    compiled = torch.compile(lambda h, w, b, y: chunked_cross_entropy(h, w, b, y, 8), fullgraph=True)
    ref, ref_grads = _losses_and_grads(_plain, hidden, weight, None, labels, upstream)
    got, got_grads = _losses_and_grads(compiled, hidden, weight, None, labels, upstream)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_compiled_model_with_ce_chunk_matches_eager_in_one_graph_per_chunk_count():
    """train.compile with ce_chunk: the same chunk count reuses the graph; losses and gradients are eager's."""
    eager, compiled, graphs = eager_and_compiled(tiny("model.ce_chunk=5").train())
    for step in range(2):
        batch = make_batch(seed=step, indices=True)
        outs = [model(batch) for model in (eager, compiled)]
        for out in outs:
            out.loss.backward()
        torch.testing.assert_close(outs[1].loss, outs[0].loss)
        for a, b in zip(eager.parameters(), compiled.parameters()):
            if a.grad is not None:
                torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6)
                a.grad = b.grad = None
    torch._dynamo.reset()
    assert len(graphs) == 1
