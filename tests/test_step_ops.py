"""benchmarks/step_ops.py's counting: views are not counted, an inserted `.item()` is one host sync,
a dtype change is one cast, and on the tiny shape coarse_fine runs more aten ops than coarse_only."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_ops.py"


def _step_ops():
    spec = importlib.util.spec_from_file_location("step_ops", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Syncing(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x):
        y = self.linear(x).view(2, 8).transpose(0, 1).reshape(-1)  # views only after the linear
        if y.sum().item() > 1e9:  # the deliberate host sync
            y = y * 2
        return y.to(torch.float64).sum()


def test_views_are_not_counted_and_an_item_is_one_sync():
    ops = _step_ops()
    x = torch.randn(4, 4)
    with ops.OpCounter() as plain:
        torch.ones(3).view(3, 1).transpose(0, 1).unsqueeze(0).expand(2, 1, 3)
    assert plain.total() == 1 and plain.views == 4  # `ones` (one fill); 4 views skipped
    assert plain.n_syncs() == 0

    module = Syncing()
    with ops.OpCounter() as counter:
        module(x)
    assert counter.n_syncs() == 1
    (site,) = counter.syncs["forward"]
    assert site.startswith("_local_scalar_dense") and "test_step_ops.py" in site and ".item()" in site
    assert sum(counter.casts.values()) == 1  # the float64 copy
    assert counter.views >= 3
    assert "view" not in counter.ops["forward"] and "transpose" not in counter.ops["forward"]


def test_boolean_mask_gather_is_a_sync_and_an_index_with_integers_is_not():
    ops = _step_ops()
    x, mask = torch.randn(4, 3), torch.tensor([True, False, True, True])
    with ops.OpCounter() as counter:
        x[mask]
        x[torch.tensor([0, 2])]
    assert counter.n_syncs() == 1
    assert counter.ops["forward"]["index"] == 2


def test_tiny_coarse_fine_runs_more_ops_than_coarse_only_and_neither_waits_for_the_device():
    """With the indices the loader's collate builds on the host, the step syncs nowhere; the same
    batch without them makes the model find them (`nonzero`: syncs in fvlm/model/)."""
    ops = _step_ops()
    batch, bare = ops.make_batch(2, 2, 16, 32), ops.make_batch(2, 2, 16, 32, indices=False)
    counts = {}
    for variant in ("coarse_fine", "coarse_only"):
        _, model = ops.build("tiny", variant, 32)
        counts[variant] = ops.count_step(model, batch, bf16=False)
        counts[variant + " bare"] = ops.count_step(model, bare, bf16=False)
    fine, coarse = counts["coarse_fine"], counts["coarse_only"]
    assert fine.total() > coarse.total() > 0
    assert fine.total("backward") > 0 and fine.total("forward") > 0
    assert fine.n_syncs() == coarse.n_syncs() == 0
    assert sum(fine.casts.values()) < fine.total()
    bare_fine = counts["coarse_fine bare"]
    assert bare_fine.n_syncs() > 0
    sites = "\n".join(bare_fine.syncs["forward"])
    assert "fvlm/model/" in sites and "nonzero" in sites


def test_the_compiled_step_is_one_graph_over_batches_of_one_bucket():
    """train.compile's `_forward`: fullgraph, one graph, no recompile over batches that differ in
    frames, text lengths and targets (dynamo only: the backend runs the graphs as they are)."""
    ops = _step_ops()
    _, model = ops.build("tiny", "coarse_fine", 32)
    report = ops.compile_report(model, ops.make_batch(2, 2, 16, 32), ops.loader_batches(6, 2, 2, 16, 32))
    assert report["fullgraph"] == "ok"
    assert report["graphs"] == 1 and report["graphs_first_call"] == 1
    assert report["recompiles"] == 0


def test_bf16_weights_cast_no_weight_where_autocast_casts_every_one():
    """train.precision=bf16 (bf16 parameters, fp32 masters) against bf16-autocast on the tiny shape:
    fewer ops and casts, and no cast reads a parameter."""
    ops = _step_ops()
    batch = ops.make_batch(2, 2, 16, 32)
    _, model = ops.build("tiny", "coarse_fine", 32)
    autocast = ops.count_step(model, batch, bf16=True)
    ops.with_masters(model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    params = {p.data_ptr() for p in model.parameters()}

    class WeightCasts(ops.OpCounter):
        weight_casts = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if ops._cast(func, args, kwargs or {}) and args[0].data_ptr() in params:
                self.weight_casts += 1
            return super().__torch_dispatch__(func, types, args, kwargs)

    model.zero_grad(set_to_none=True)
    ops.count_step(model, batch, bf16=False)  # warm-up
    with WeightCasts() as bf16:
        loss = model(batch, compute_coarse=False).loss
        bf16.phase = "backward"
        loss.backward()
    assert bf16.weight_casts == 0
    casts, autocast_casts = sum(bf16.casts.values()), sum(autocast.casts.values())
    assert 0 < casts < autocast_casts / 2
    assert bf16.total() < autocast.total()
