"""train.static_shapes (every batch padded to the shape ladder) and the plumbing of train.cuda_graphs
that a CPU can check: the padding changes no loss and no gradient, the loader's batches take only
ladder sizes, and outputs and gradients are copied out of a graph's memory without changing them."""

import pytest
import torch
from conftest import eager_and_compiled

from fvlm.config import load_config
from fvlm.data.loader import build_loader
from fvlm.data.synth import generate_synthetic
from fvlm.errors import UsageError
from fvlm.model.batch_index import bucket
from fvlm.model.build import build_model, compile_model
from fvlm.model.tokenizer import byte_tokenizer
from fvlm.model.vlm import _outside_graph_memory
from fvlm.training.trainer import own_gradients

TOK = byte_tokenizer()


def test_the_shape_ladder_pads_by_less_than_a_quarter_and_takes_few_values():
    values = list(range(1, 4097))
    ladder = [bucket(v) for v in values]
    for v, b in zip(values, ladder):
        assert b == v if v <= 8 else v <= b < 1.25 * v, (v, b)
        assert bucket(b) == b  # a ladder size stays where it is
    assert all(a <= b for a, b in zip(ladder, ladder[1:]))
    assert len(set(ladder)) == 8 + 4 * 9  # exact to 8, then four sizes per octave up to 4096
    assert bucket(33, 36) == 36 and bucket(33) == 40  # a cap the data never exceeds bounds the padding
    assert bucket(50, 36) == 56  # over the cap: the ladder as usual


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate_synthetic(out, videos=48, images=16, texts=16, frames=4, size=32, seed=3, val=20, probe=4, bench=8)
    return out


def cfg_for(synth, **overrides):
    values = {
        "model.image_size": 32,
        "data.max_frames": 4,
        "data.max_text_tokens": 200,
        "train.batch_size": 3,
        "data.train": str(synth / "train"),
        "data.val": str(synth / "val"),
        **overrides,
    }
    return load_config(None, values)


def batches(cfg, n):
    out = []
    for batch in build_loader(cfg, "train", TOK):
        out.append(batch)
        if len(out) == n:
            return out
    return out


def shapes(batch):
    return tuple(tuple(batch[k].shape) for k in ("frames", "input_ids", "frame_rows", "target_rows"))


def test_static_batches_hold_the_same_samples_padded_to_ladder_sizes(synth):
    plain = batches(cfg_for(synth), 20)
    static = batches(cfg_for(synth, **{"train.static_shapes": True}), 20)
    for p, s in zip(plain, static, strict=True):
        assert p["keys"] == s["keys"] and p["n_targets"] == s["n_targets"]
        t, length = p["frames"].shape[1], p["input_ids"].shape[1]
        assert s["frames"].shape[1] == bucket(t, 4) and s["input_ids"].shape[1] == bucket(length, 200)
        # The frame and target lists: on the ladder, at most every slot of the padded batch.
        frames = p["frame_rows"].shape[0]
        assert s["frame_rows"].shape[0] == (bucket(frames, s["frame_mask"].numel()) if frames else 0)
        assert s["target_rows"].shape[0] == bucket(max(p["n_targets"], 1), s["loss_mask"].numel())
        # The real content is where it was; what was added is padding.
        assert torch.equal(s["frames"][:, :t], p["frames"]) and not s["frames"][:, t:].any()
        assert torch.equal(s["frame_mask"][:, :t], p["frame_mask"]) and not s["frame_mask"][:, t:].any()
        for key in ("input_ids", "attention_mask", "loss_mask"):
            assert torch.equal(s[key][:, :length], p[key])
        assert not s["attention_mask"][:, length:].any() and not s["loss_mask"][:, length:].any()
        n = p["n_targets"]
        for key in ("target_rows", "target_cols"):
            assert torch.equal(s[key][:n], p[key])
        assert s["target_weight"].sum() == n
    assert len({shapes(b) for b in static}) < len({shapes(b) for b in plain})


def _step(model, batch):
    out = model(batch, compute_coarse=True)
    (out.loss * out.n_tokens).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out, grads


@pytest.mark.parametrize("overrides", [{}, {"model.deep_query": False, "model.lambda_coarse": 0.5}])
def test_padding_to_the_ladder_changes_no_loss_and_no_gradient(synth, overrides):
    cfg = cfg_for(synth, **overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    plain = batches(cfg, 4)
    static = batches(cfg_for(synth, **overrides, **{"train.static_shapes": True}), 4)
    padded_somewhere = 0
    for p, s in zip(plain, static, strict=True):
        padded_somewhere += shapes(p) != shapes(s)
        (a, grads_a), (b, grads_b) = _step(model, p), _step(model, s)
        assert a.n_tokens == b.n_tokens
        for name in ("loss", "loss_fine", "loss_coarse"):
            assert torch.allclose(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-6), name
        assert grads_a.keys() == grads_b.keys()
        for name, grad in grads_a.items():
            assert torch.allclose(grad, grads_b[name], rtol=1e-4, atol=1e-6), name
    assert padded_somewhere >= 3


def test_static_batches_compile_into_one_graph(synth):
    """The ladder's sizes are still marked dynamic: one graph serves them all (a CUDA graph is then
    captured per concrete shape, on a GPU)."""
    cfg = cfg_for(synth, **{"train.static_shapes": True})
    torch.manual_seed(0)
    eager, compiled, graphs = eager_and_compiled(build_model(cfg.model).train())
    static = batches(cfg, 6)
    assert len({shapes(b) for b in static}) >= 3
    for batch in static:
        outs = [model(batch, compute_coarse=False) for model in (eager, compiled)]
        assert torch.allclose(outs[0].loss, outs[1].loss, atol=1e-6)
    torch._dynamo.reset()
    assert len(graphs) == 1


def test_cuda_graphs_needs_compile_and_static_shapes():
    for overrides in ({"train.cuda_graphs": True}, {"train.cuda_graphs": True, "train.compile": True}):
        with pytest.raises(UsageError, match="train.cuda_graphs needs train.compile=true and train.static_shapes"):
            load_config(None, overrides)
    cfg = load_config(None, {"train.cuda_graphs": True, "train.compile": True, "train.static_shapes": True})
    assert cfg.train.cuda_graphs
    with pytest.raises(ValueError, match="inductor"):
        compile_model(build_model(cfg.model), backend="eager", cuda_graphs=True)


def test_outputs_and_gradients_leave_the_graph_memory_unchanged(synth):
    """What `forward` and the trainer do under train.cuda_graphs (a replay overwrites its outputs):
    the outputs are copies that still backpropagate, and each gradient moves to memory of its own."""
    cfg = cfg_for(synth)
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    (batch,) = batches(cfg, 1)
    out = model(batch, compute_coarse=True, return_attention=True)
    copied = _outside_graph_memory(out)
    for name in ("loss", "loss_fine", "loss_coarse", "target_count", "entropy_weights"):
        a, b = getattr(out, name), getattr(copied, name)
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name
    assert copied.attention.keys() == out.attention.keys() == {"coarse", "fine"}
    copied.loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    before = {id(p): (p.grad.clone(), p.grad.data_ptr()) for p in params if p.grad is not None}
    assert before
    own_gradients(params)
    for p in params:
        if id(p) in before:
            assert torch.equal(p.grad, before[id(p)][0]) and p.grad.data_ptr() != before[id(p)][1]
        else:
            assert p.grad is None
