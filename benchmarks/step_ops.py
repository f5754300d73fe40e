"""Aten operations, casts, host syncs, graphs and recompiles of one training step: today's numbers
against the baseline the speed issue measured and the issue's targets.

    .venv/bin/python benchmarks/step_ops.py [--shape 135m|tiny] [--batch 2] [--frames 4] [--size 56]
        [--text 64] [--variants coarse_fine,coarse_only,multi_token] [--precisions fp32,bf16-autocast,bf16]
        [--no-compile] [--no-trainer] [--json PATH]

CPU only, random weights (the backbones' layouts via `build_model`, as benchmarks/bench_model.py does).
A step is forward + backward (`model(batch, compute_coarse=False).loss.backward()`), the optimizer left
out, once per precision, named as `train.precision` names them (fvlm/training/precision.py): `fp32`,
`bf16-autocast` (fp32 weights under bf16 autocast) and `bf16` (the model's parameters in bf16, fp32
master weights in the optimizer; forward + backward are then the same with the masters left out). Every
count is exact (no timing), so one step each is enough; a warm-up step runs first so that one-time work
(lazy buffers, caches) is not counted. The trainer part (below) runs the real trainer step in `fp32`
and, when `bf16` is among the precisions, in `bf16` too: its optimizer phase then shows what the master
weights add per step (moving the bf16 gradients into fp32 ones and rounding the updated masters back,
one multi-tensor copy each).

How each count is defined (`OpCounter`, a TorchDispatchMode):
- aten ops: every call that reaches the mode, i.e. the ops the dispatcher runs below autograd, after
  CompositeImplicitAutograd ops have been decomposed (so `torch.matmul` shows up as the `mm`/`bmm` it
  runs, `.to(dtype)` as `_to_copy`). The mode is popped while an op runs, so ops that a kernel or a
  CompositeExplicit decomposition calls from inside itself are not counted again: one count per op the
  step asked for. Views are skipped (`func.is_view`: schema alias annotations, e.g. `view`, `transpose`,
  `expand`, `slice`, `detach`), and so are the few ops that only reshape metadata or allocate
  (`NO_KERNEL`: `_unsafe_view`, `empty*`, `lift_fresh`, ...): what is left launches at least one kernel.
  Split into forward (until `backward()` is called) and backward.
- casts: `_to_copy` whose `dtype` differs from its input's, and `copy_` or `_foreach_copy_` between
  tensors of different dtypes (subsets of the aten ops above; a `_foreach_copy_` counts once, however
  many tensors it converts).
- host syncs: ops whose output size or value the host needs before it can go on, i.e. that sync a GPU
  with the host (on CPU nothing waits, so they are counted, as the issue does): `_local_scalar_dense`
  (`.item()`, `int()`, `float()`, `bool()` of a tensor), `is_nonzero`, `equal`, `nonzero`,
  `masked_select`, `unique*`, `repeat_interleave` of a tensor, and `index`/`index_put_` with a boolean
  mask (they run `nonzero` inside). Each one records its innermost fvlm/ and transformers/ callers.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import sys
import time
import traceback
from contextlib import nullcontext
from types import SimpleNamespace
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fvlm.model.batch_index import build_indices, random_padded_batch

# The issue's measurement (B2, T4, 56 px, 135M layout, CPU, eager, forward + backward, no optimizer).
ISSUE_BASELINE = {
    "aten_ops": {
        ("coarse_fine", "bf16-autocast"): 11_831,
        ("coarse_fine", "fp32"): 9_625,
        ("coarse_only", "fp32"): 4_984,
        ("multi_token", "fp32"): 4_243,
    },
    "casts_added_by_autocast": 2_650,  # approx.
    "host_syncs_fwd_bwd": 15,
    "host_syncs_trainer": 4,  # 3 float() reads per micro-batch + the clip norm
    "host_syncs_step": 19,
    "fullgraph": "fails at the frame_mask.sum() branch",
}
ISSUE_TARGETS = {"host_syncs_fwd_bwd": 0, "graphs": 1, "aten_ops_bf16_coarse_fine": 7_000}

aten = torch.ops.aten
NO_KERNEL = {
    aten._unsafe_view.default,
    aten.empty.memory_format,
    aten.empty_strided.default,
    aten.empty_like.default,
    aten.new_empty.default,
    aten.new_empty_strided.default,
    aten.lift_fresh.default,
    aten.set_.source_Storage_storage_offset,
    aten.resize_.default,
}
SYNC_OPS = {
    aten._local_scalar_dense.default: "_local_scalar_dense (.item/int/float/bool)",
    aten.is_nonzero.default: "is_nonzero",
    aten.equal.default: "equal",
    aten.nonzero.default: "nonzero",
    aten.nonzero_static.default: None,  # static size: no sync
    aten.masked_select.default: "masked_select",
    aten._unique2.default: "unique",
    aten.unique_dim.default: "unique",
    aten.unique_consecutive.default: "unique",
    aten.repeat_interleave.Tensor: "repeat_interleave(Tensor)",
}
SHAPES = {
    "tiny": dict(overrides={}, batch=2, frames=4, size=56, text=32),
    "135m": dict(overrides={"llm": "smollm2-135m", "dino": "dinov2-small"}, batch=2, frames=4, size=56, text=64),
}
VARIANTS = {
    "coarse_fine": {},
    "coarse_only": {"coarse_only": True},
    "multi_token": {"arch": "multi_token", "tokens_per_frame": 16},
}
CALLER_DIRS = ("/fvlm/", "/transformers/", "/tests/")


def _is_view(func) -> bool:
    """A view (the schema's alias annotations: the output aliases an input and no kernel runs)."""
    return bool(getattr(func, "is_view", False))


def _tensors(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (x for x in a if isinstance(x, torch.Tensor))


def _sync_name(func, args) -> str | None:
    if func in SYNC_OPS:
        return SYNC_OPS[func]
    if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default):
        indices = args[1] if len(args) > 1 else []
        if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
            return f"{func.overloadpacket.__name__} with a boolean mask"
    return None


def _cast(func, args, kwargs) -> bool:
    if func == aten._to_copy.default:
        dtype = kwargs.get("dtype")
        return dtype is not None and dtype != args[0].dtype
    if func == aten.copy_.default:
        return args[0].dtype != args[1].dtype
    if func == aten._foreach_copy_.default:
        return any(a.dtype != b.dtype for a, b in zip(args[0], args[1]))
    return False


def caller(skip: int = 3) -> str:
    """The innermost fvlm/ (or transformers/, tests/) frames of the current Python stack, innermost last."""
    if torch._C._current_graph_task_id() != -1:
        return "<autograd engine (backward)>"
    frames = [f for f in traceback.extract_stack()[:-skip] if any(d in f.filename for d in CALLER_DIRS)]
    if not frames:
        return "<no fvlm frame>"
    parts = []
    for f in frames[-2:]:
        path = f.filename.replace("\\", "/")
        for d in CALLER_DIRS:
            if d in path:
                path = d.strip("/") + "/" + path.split(d, 1)[1]
                break
        parts.append(f"{path}:{f.lineno} {f.name}: {(f.line or '').strip()[:70]}")
    return " <- ".join(reversed(parts))


class OpCounter(TorchDispatchMode):
    """Counts the kernel-launching aten ops, casts and host syncs that reach it, per phase."""

    def __init__(self):
        super().__init__()
        self.phase = "forward"
        self.ops: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.casts: collections.Counter = collections.Counter()
        self.syncs: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.views = 0
        self.no_kernel: collections.Counter = collections.Counter()  # allocations, metadata-only ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_view(func):
            self.views += 1
        elif func in NO_KERNEL:
            self.no_kernel[str(func.overloadpacket.__name__)] += 1
        else:
            self.ops[self.phase][str(func.overloadpacket.__name__)] += 1
            if _cast(func, args, kwargs):
                self.casts[self.phase] += 1
            name = _sync_name(func, args)
            if name is not None:
                self.syncs[self.phase][f"{name} @ {caller()}"] += 1
        return func(*args, **kwargs)

    def total(self, phase: str | None = None) -> int:
        return sum(sum(c.values()) for p, c in self.ops.items() if phase in (None, p))

    def n_syncs(self, phase: str | None = None) -> int:
        return sum(sum(c.values()) for p, c in self.syncs.items() if phase in (None, p))


def make_batch(b: int, t: int, length: int, size: int, indices: bool = True) -> dict[str, Any]:
    """The issue's batch (every frame and token real, every token a target), with the frame and
    target indices the loader's collate builds on the host (`indices=False`: a batch without them,
    as before collate built them; the model then finds them itself)."""
    g = torch.Generator().manual_seed(0)
    batch: dict[str, Any] = {
        "frames": torch.randn(b, t, 3, size, size, generator=g),
        "frame_mask": torch.ones(b, t, dtype=torch.bool),
        "input_ids": torch.randint(4, 250, (b, length), generator=g),
        "attention_mask": torch.ones(b, length, dtype=torch.long),
        "loss_mask": torch.ones(b, length, dtype=torch.bool),
    }
    if indices:
        batch.update(build_indices(batch["frame_mask"], batch["loss_mask"]))
    return batch


def loader_batches(n: int, b: int, t: int, length: int, size: int, seed: int = 1) -> list[dict[str, Any]]:
    """`n` batches of one shape bucket (B, T, text length) with different content, as the loader's
    collate makes them: each sample a random number of real frames (valid first) and of text tokens
    (right-padded), targets a random run of its text."""
    g = torch.Generator().manual_seed(seed)
    return [random_padded_batch(g, b, t, length, size) for _ in range(n)]


def build(shape: str, variant: str, size: int):
    from fvlm.config import load_config
    from fvlm.model.build import build_model

    torch.manual_seed(0)
    cfg = load_config(None, {"model": {**SHAPES[shape]["overrides"], **VARIANTS[variant], "image_size": size}}).model
    return cfg, build_model(cfg).train()


def with_masters(model):
    """The model turned to bf16 parameters with fp32 masters, as train.precision=bf16 does it."""
    from fvlm.training.precision import MasterWeights

    return MasterWeights(model, [p for params in model.param_groups().values() for p in params])


def count_step(model, batch, bf16: bool) -> OpCounter:
    """One forward + backward under the counter (after one uncounted warm-up step); `bf16`: under bf16
    autocast (a model with bf16 parameters runs without it)."""

    def step(counter: OpCounter | None):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(batch, compute_coarse=False).loss
        if counter is not None:
            counter.phase = "backward"
        loss.backward()
        model.zero_grad(set_to_none=True)

    step(None)
    counter = OpCounter()
    with counter:
        step(counter)
    return counter


def trainer_syncs(cfg, model, batch, masters=None) -> dict[str, Any]:
    """Runs the trainer's own `_forward_backward` and `_optimizer_step` (fvlm/training/trainer.py,
    unbound, on a stand-in `self`) under the counter, as a step that logs nothing (compute_coarse
    False); the syncs whose innermost caller is fvlm/training/ (not the model call, not the autograd
    engine) are the trainer's. Reads of the loader's CPU batch before `to_device` are listed apart: on a GPU
    they do not wait for the device. With `masters` (a bf16 model's MasterWeights) the step is
    train.precision=bf16's; the optimizer phase's ops and casts are returned too."""
    from fvlm.config import OptimConfig, load_config
    from fvlm.training.dist import Dist
    from fvlm.training.engine import Engine
    from fvlm.training.optim import build_optimizer
    from fvlm.training.trainer import Trainer

    trainable = [p for p in model.parameters() if p.requires_grad]
    stand_in = SimpleNamespace(
        model=model,
        trainable=trainable,
        masters=masters,
        optimized=masters.masters if masters is not None else trainable,
        optimizer=build_optimizer(model, OptimConfig(), masters),
        autocast=nullcontext,
        dist=Dist(),
        engine=Engine(model, Dist()),
        cfg=load_config(None, {}),
    )
    stand_in._zero_grad = lambda: Trainer._zero_grad(stand_in)  # type: ignore[arg-type]
    counter = OpCounter()
    with counter:
        tally = Trainer._forward_backward(stand_in, [batch], compute_coarse=False)  # type: ignore[arg-type]
        counter.phase = "optimizer"
        Trainer._optimizer_step(stand_in, max(tally.tokens, 1))  # type: ignore[arg-type]
    model.zero_grad(set_to_none=True)
    trainer_sites = collections.Counter()
    for sites in counter.syncs.values():
        for site, n in sites.items():
            innermost = site.split(" @ ", 1)[1].split(" <- ")[0]
            if innermost.startswith("fvlm/training/") and "self.engine(" not in innermost:
                trainer_sites[site] += n
    loader_side = sum(n for s, n in trainer_sites.items() if 'batch["' in s)
    total = sum(trainer_sites.values())
    return {
        "total": total,
        "device": total - loader_side,
        "loader_batch_reads": loader_side,
        "sites": trainer_sites,
        "step_aten_ops": counter.total(),
        "step_casts": sum(counter.casts.values()),
        "optimizer_ops": counter.total("optimizer"),
        "optimizer_casts": counter.casts["optimizer"],
        "optimizer_top_ops": counter.ops["optimizer"].most_common(6),
    }


def compile_report(model, batch, others: list[dict[str, Any]]) -> dict[str, Any]:
    """What `train.compile` compiles (the model's `_forward`, fvlm.model.build.compile_model):
    `fullgraph=True` (dynamo only, backend "eager": the graph breaks are dynamo's), then
    `torch._dynamo.explain` for the graph count, then the graphs compiled over `others` (batches of
    one bucket with other content: frames, text lengths and targets) after the first batch."""
    import copy

    import torch._dynamo

    from fvlm.model.build import compile_model
    from fvlm.model.vlm import mark_dynamic

    def forward(b):
        return model._forward(b, None, False, False).loss

    mark_dynamic(batch)  # as the model's forward does before a compiled step

    out: dict[str, Any] = {}
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    torch._dynamo.reset()
    start = time.perf_counter()
    try:
        torch.compile(forward, fullgraph=True, backend="eager")(batch)
        out["fullgraph"] = "ok"
    except Exception as exc:  # noqa: BLE001 - the first line is the report
        lines = str(exc).strip().splitlines()
        where = [ln.strip() for ln in lines if "fvlm/" in ln]
        out["fullgraph"] = f"{type(exc).__name__}: {lines[0][:160]}" + (f" [{where[-1][-90:]}]" if where else "")
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(forward)(batch)
    out["graphs"] = explanation.graph_count
    out["graph_breaks"] = explanation.graph_break_count
    out["break_reasons"] = [
        f"{r.reason.strip().splitlines()[0][:120]}"
        + (f" @ {r.user_stack[-1].filename.split('/')[-1]}:{r.user_stack[-1].lineno}" if r.user_stack else "")
        for r in explanation.break_reasons[:8]
    ]
    torch._dynamo.reset()
    compiles = 0

    def counting_backend(gm, example_inputs):
        nonlocal compiles
        compiles += 1
        return gm.forward

    compiled = compile_model(copy.deepcopy(model), backend=counting_backend)
    compiled(batch, compute_coarse=False)
    first = compiles
    for other in others:
        compiled(other, compute_coarse=False)
    out["graphs_first_call"] = first
    out["recompiles"] = compiles - first
    out["recompile_batches"] = len(others)
    out["seconds"] = round(time.perf_counter() - start, 1)
    torch._dynamo.reset()
    return out


def _n(value: int | None) -> str:
    return f"{value:,}" if value is not None else "-"


def ratio(now: float | None, ref: float | None) -> str:
    if now is None or not ref:
        return ""
    return f"{now / ref:.2f}x"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=tuple(SHAPES), default="135m")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--frames", type=int)
    parser.add_argument("--size", type=int)
    parser.add_argument("--text", type=int)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--precisions", default="fp32,bf16-autocast,bf16", help="of fp32, bf16-autocast, bf16")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile / explain part")
    parser.add_argument("--no-trainer", action="store_true", help="skip the trainer step")
    parser.add_argument(
        "--no-indices", action="store_true", help="batches without the host-built indices (the model finds them)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = SHAPES[args.shape]
    b, t = args.batch or shape["batch"], args.frames or shape["frames"]
    size, length = args.size or shape["size"], args.text or shape["text"]
    batch = make_batch(b, t, length, size, indices=not args.no_indices)
    variants = args.variants.split(",")
    precisions = args.precisions.split(",")
    unknown = set(precisions) - {"fp32", "bf16-autocast", "bf16"}
    if unknown:
        parser.error(f"--precisions: unknown {', '.join(sorted(unknown))} (of fp32, bf16-autocast, bf16)")
    results: dict[str, Any] = {
        "shape": args.shape,
        "batch": b,
        "frames": t,
        "size": size,
        "text": length,
        "host_indices": not args.no_indices,
        "rows": [],
    }
    sync_sites: dict[str, collections.Counter] = {}
    for variant in variants:
        cfg, model = build(args.shape, variant, size)
        for precision in precisions:
            if precision == "bf16":
                _, bf16_model = build(args.shape, variant, size)
                masters = with_masters(bf16_model)
                c = count_step(bf16_model, batch, False)
            else:
                c = count_step(model, batch, precision == "bf16-autocast")
            results["rows"].append(
                {
                    "variant": variant,
                    "precision": precision,
                    "aten_ops": c.total(),
                    "forward": c.total("forward"),
                    "backward": c.total("backward"),
                    "casts": sum(c.casts.values()),
                    "syncs": c.n_syncs(),
                    "syncs_backward": c.n_syncs("backward"),
                    "views_skipped": c.views,
                    "no_kernel_skipped": dict(c.no_kernel),
                    "top_ops": c.ops["forward"].most_common(5),
                }
            )
            sites: collections.Counter = collections.Counter()
            for phase_sites in c.syncs.values():
                sites.update(phase_sites)
            sync_sites[f"{variant} {precision}"] = sites
        if variant == "coarse_fine":
            if not args.no_trainer:
                results["trainer"] = trainer_syncs(cfg, model, batch)
                if "bf16" in precisions:
                    results["trainer_bf16"] = trainer_syncs(cfg, bf16_model, batch, masters)
            if not args.no_compile:
                others = loader_batches(20, b, t, length, size)
                if args.no_indices:
                    others = [{k: v for k, v in o.items() if k in batch} for o in others]
                results["compile"] = compile_report(model, batch, others)
        del model
        if "bf16" in precisions:
            del bf16_model, masters
    print_report(results, sync_sites)
    if args.json:
        serial = json.loads(
            json.dumps(results, default=lambda o: dict(o) if isinstance(o, collections.Counter) else str(o))
        )
        serial["sync_sites"] = {k: dict(v) for k, v in sync_sites.items()}
        with open(args.json, "w") as f:
            json.dump(serial, f, indent=1)
    return results


def print_report(results: dict[str, Any], sync_sites: dict[str, collections.Counter]) -> None:
    r = results
    print(f"[step_ops] shape {r['shape']}: B{r['batch']} T{r['frames']} {r['size']}px text {r['text']}, CPU, eager,")
    indices = "built on the host, as the loader's collate does" if r["host_indices"] else "left to the model"
    print(f"  frame and target indices {indices}")
    print("  forward+backward per step (optimizer left out); baseline = the speed issue's measurement (B2 T4 56px)")
    head = f"{'variant':<12} {'prec':<13} {'aten ops':>9} {'fwd':>7} {'bwd':>7} {'casts':>6} {'syncs':>6}"
    print(head + f" {'issue baseline':>15} {'vs baseline':>11} {'target':>7} {'vs target':>9}")
    fp32 = {row["variant"]: row for row in r["rows"] if row["precision"] == "fp32"}
    for row in r["rows"]:
        key = (row["variant"], row["precision"])
        base = ISSUE_BASELINE["aten_ops"].get(key)
        bf16_row = key in (("coarse_fine", "bf16"), ("coarse_fine", "bf16-autocast"))
        target = ISSUE_TARGETS["aten_ops_bf16_coarse_fine"] if bf16_row else None
        print(
            f"{row['variant']:<12} {row['precision']:<13} {row['aten_ops']:>9,} {row['forward']:>7,} "
            f"{row['backward']:>7,} {row['casts']:>6,} {row['syncs']:>6} {_n(base):>15} "
            f"{ratio(row['aten_ops'], base):>11} {_n(target):>7} {ratio(row['aten_ops'], target):>9}"
        )
        if row["precision"] == "bf16-autocast" and row["variant"] in fp32:
            extra = row["casts"] - fp32[row["variant"]]["casts"]
            print(
                f"{'':<26} autocast adds {extra:,} casts (issue baseline ~{ISSUE_BASELINE['casts_added_by_autocast']:,})"
            )
    skipped = ", ".join(
        f"{row['variant']} {row['precision']} {row['views_skipped']:,} views + {sum(row['no_kernel_skipped'].values()):,}"
        for row in r["rows"]
    )
    print(f"not counted (views; allocation/metadata-only ops, mostly _unsafe_view): {skipped}")
    cf = [row for row in r["rows"] if row["variant"] == "coarse_fine"]
    if cf:
        syncs = cf[0]["syncs"]
        print(
            f"host syncs, coarse_fine forward+backward: {syncs} (issue baseline {ISSUE_BASELINE['host_syncs_fwd_bwd']},"
            f" target {ISSUE_TARGETS['host_syncs_fwd_bwd']})"
        )
    if "trainer" in r:
        tr = r["trainer"]
        print(
            f"trainer's own syncs per step (one real _forward_backward + _optimizer_step, 1 micro-batch): {tr['total']}"
            f" = {tr['device']} on device tensors + {tr['loader_batch_reads']} reads of the loader's CPU batch"
            f" (issue baseline {ISSUE_BASELINE['host_syncs_trainer']})"
        )
        for site, n in tr["sites"].most_common():
            print(f"    {n:>3}  {site}")
        if cf:
            print(
                f"host syncs per coarse_fine step, model + trainer: {cf[0]['syncs'] + tr['device']}"
                f" (+{tr['loader_batch_reads']} CPU batch reads; issue baseline {ISSUE_BASELINE['host_syncs_step']})"
            )
    if "trainer_bf16" in r and "trainer" in r:
        fp, bf = r["trainer"], r["trainer_bf16"]
        print(
            "trainer step (forward + backward + optimizer, 1 micro-batch), fp32 -> bf16 with fp32 masters:"
            f" {fp['step_aten_ops']:,} -> {bf['step_aten_ops']:,} aten ops, {fp['step_casts']} -> {bf['step_casts']}"
            f" casts; optimizer phase {fp['optimizer_ops']} -> {bf['optimizer_ops']} ops"
            f" ({bf['optimizer_casts']} casts: {', '.join(f'{k} {n}' for k, n in bf['optimizer_top_ops'])});"
            f" trainer syncs {fp['device']} -> {bf['device']}"
        )
    if "compile" in r:
        c = r["compile"]
        print(f"torch.compile(fullgraph=True): {c['fullgraph']}   (issue baseline: {ISSUE_BASELINE['fullgraph']})")
        print(
            f"dynamo explain: {c['graphs']} graphs, {c['graph_breaks']} graph breaks (target {ISSUE_TARGETS['graphs']}"
            f" graph); first call compiled {c['graphs_first_call']} graphs, recompiles over"
            f" {c['recompile_batches']} more batches of the bucket (other frames, text lengths, targets):"
            f" {c['recompiles']}  [{c['seconds']}s]"
        )
        for reason in c["break_reasons"]:
            print(f"    break: {reason}")
    for key, sites in sync_sites.items():
        if key.endswith("fp32") or len(sync_sites) == 1:
            print(f"host sync call sites, {key} ({sum(sites.values())}):")
            for site, n in sites.most_common(12):
                print(f"    {n:>3}  {site}")


if __name__ == "__main__":
    main(sys.argv[1:])
