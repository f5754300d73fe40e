"""The GPU check: everything the plan's runs need to know about a GPU, measured in a few minutes.

    python benchmarks/gpu_check.py [--out DIR] [--sizes 135m,360m,1.7b] [--steps N] [--dense] [--no-record]
    python benchmarks/gpu_check.py --reduced [--out DIR]      # the CPU-sized version CI runs

On one H100/H200 it takes about 5-8 minutes. With random weights of the paper shapes (SmolLM2
135M / 360M / 1.7B + DINOv2-small at 224 px, 16 frames and 484 text tokens per sample, the plan's
sample; each size's shipped config, so its per-GPU batch and gradient checkpointing) it measures:

1. step time, MFU and peak memory of a training step (forward, backward, AdamW) for the foveated
   model (coarse_fine), coarse-only and the 16-token multi-token baseline, in bf16;
2. `torch.compile` on vs off (135M foveated), with dynamo's graph and recompile counts;
3. bf16 vs fp32 loss parity over a few steps from the same weights and batches;
4. data-loader throughput at 224 px with 0, 2 and 4 workers (synthetic shards written to a temp folder);
5. a manual gradient all-reduce (sum after backward, flat buckets: what the trainer did before it
   used DDP) against the trainer's DDP engine (fvlm/training/engine.py: all-reduce overlapped with
   backward), in 2 processes: NCCL on 2 GPUs if visible, else gloo on the CPU at the reduced shapes
   (that checks the code path only).

Steps 1 and 2 run on padded batches shaped like the loader's: each sample a random number of real
frames (1..16, valid first), a random text length (right-padded), targets a random run of its text,
and the frame and target indices of fvlm.model.batch_index that the sync-free step uses; each timed
step gets a different batch, so the compiled step sees changing sizes. Their MFU counts each
sample's real frames and targets. `--dense` adds rows (and a compile comparison) on all-ones
batches, every frame and token real, as the check ran before; MFU recorded for the cost estimate
comes from the padded rows.

It writes DIR/gpu_check.json and DIR/gpu_check.md (default DIR: benchmarks/gpu_check/<device>), and on
a GPU records the measured MFU of each shape in benchmarks/mfu_measured.json, which
`fvlm phase1 --preset paper --dry-run` reads in place of its assumed 30%. MFU is the exact FLOP
counter's training FLOPs (fvlm.model.flops) over step time, against the bf16 dense peak of the
device (fvlm.training.throughput.BF16_PEAKS); goal: >= 40% at 135M on an H100-class GPU.

`--reduced` runs the same code on tiny shapes at 32 px on the CPU in under a minute, so that the
script cannot rot between GPU sessions; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from fvlm.config import load_config  # noqa: E402
from fvlm.model.batch_index import random_padded_batch  # noqa: E402
from fvlm.model.build import build_model, compile_model  # noqa: E402
from fvlm.model.flops import estimate_flops  # noqa: E402
from fvlm.training.evaluate import to_device  # noqa: E402
from fvlm.training.optim import build_optimizer  # noqa: E402
from fvlm.training.throughput import peak_flops  # noqa: E402

FULL = {
    "configs": {"135m": "paper_135m", "360m": "paper_360m", "1.7b": "paper_1.7b"},
    "frames": 16,
    "text": 484,
    "image": 224,
    "steps": 5,
    "parity_steps": 5,
    "loader_samples": 96,
    "loader_workers": (0, 2, 4),
    "compile_backend": "inductor",
}
# On the CPU, inductor spends minutes compiling C++; the "eager" backend still runs torch.compile's
# graph capture over the model, which is what can rot.
REDUCED = {
    "configs": {"tiny": "tiny"},
    "frames": 2,
    "text": 32,
    "image": 32,
    "steps": 2,
    "parity_steps": 3,
    "loader_samples": 16,
    "loader_workers": (0, 1),
    "batch": 2,
    "compile_backend": "eager",
}
VARIANTS = {
    "coarse_fine": {},
    "coarse_only": {"model.coarse_only": True},
    "multi_token": {"model.arch": "multi_token", "model.tokens_per_frame": 16},
}


def run_config(name: str, plan: dict, overrides: dict):
    base = {"model.image_size": plan["image"], "data.max_frames": plan["frames"]}
    if "batch" in plan:
        base["train.batch_size"] = plan["batch"]
    return load_config(name, {**base, **overrides})


def make_batch(b: int, plan: dict, device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    size, t, n = plan["image"], plan["frames"], plan["text"]
    return {
        "frames": torch.randn(b, t, 3, size, size, generator=g).to(device),
        "frame_mask": torch.ones(b, t, dtype=torch.bool, device=device),
        "input_ids": torch.randint(4, 250, (b, n), generator=g).to(device),
        "attention_mask": torch.ones(b, n, dtype=torch.long, device=device),
        "loss_mask": torch.ones(b, n, dtype=torch.bool, device=device),
    }


def padded_batches(n: int, b: int, plan: dict, device, seed: int = 0) -> list[dict]:
    """`n` batches as the loader's collate makes them: each sample a random number of real frames
    (1..T, valid first, the rest zero), a random text length (T/2..N tokens, right-padded), targets a
    random run of its text, and the host-side indices of fvlm.model.batch_index (what the trainer's
    sync-free step uses)."""
    g = torch.Generator().manual_seed(seed)
    size, t, length = plan["image"], plan["frames"], plan["text"]
    return [to_device(random_padded_batch(g, b, t, length, size), device) for _ in range(n)]


def step_batches(kind: str, n: int, b: int, plan: dict, device) -> list[dict]:
    """The batches a timed run cycles through: `padded` (realistic, distinct) or `dense` (one all-ones batch)."""
    return padded_batches(n, b, plan, device) if kind == "padded" else [make_batch(b, plan, device)]


def batch_stats(batches: list[dict]) -> dict:
    """How much of the batches is real: fraction of frames, text tokens and target tokens."""
    frames = sum(int(x["frame_mask"].sum()) for x in batches) / sum(x["frame_mask"].numel() for x in batches)
    text = sum(int(x["attention_mask"].sum()) for x in batches) / sum(x["attention_mask"].numel() for x in batches)
    targets = sum(int(x["loss_mask"].sum()) for x in batches) / sum(x["loss_mask"].numel() for x in batches)
    return {"real_frames": frames, "real_text": text, "real_targets": targets, "distinct_batches": len(batches)}


def batch_flops(cfg, batches: list[dict], plan: dict) -> float:
    """Training FLOPs of one batch, averaged over `batches`: each sample at its own real frames and
    targets (the LLM runs over the padded text length)."""
    total = 0.0
    for batch in batches:
        frames = batch["frame_mask"].sum(1).tolist()
        targets = batch["loss_mask"].sum(1).tolist()
        total += sum(
            estimate_flops(cfg.model, frames=f, text_tokens=plan["text"], loss_tokens=max(n, 1)).per_sample
            for f, n in zip(frames, targets)
        )
    return total / len(batches)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_steps(cfg, batches, device, bf16: bool, steps: int, compile_backend: str | None = None, seed: int = 0):
    """(median seconds per step, losses, peak GiB): forward + backward + AdamW, step i on
    `batches[i % len(batches)]`."""
    torch.manual_seed(seed)
    model = build_model(cfg.model).to(device)
    model.train()
    if compile_backend:
        compile_model(model, backend=compile_backend)
    optimizer = build_optimizer(model, cfg.optim)
    losses, times = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(steps + 1):  # the first is a warm-up (and, compiled, the compilation)
        sync(device)
        began = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(batches[i % len(batches)], compute_coarse=cfg.model.lambda_coarse > 0).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if i:
            times.append(time.perf_counter() - began)
        losses.append(loss.item())
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return statistics.median(times), losses, peak


def check_steps(plan, device, bf16, peak, log, kinds=("padded",)) -> list[dict]:
    rows = []
    for size, name in plan["configs"].items():
        for kind in kinds:
            for variant, overrides in VARIANTS.items():
                cfg = run_config(name, plan, overrides)
                b = cfg.train.batch_size
                try:
                    batches = step_batches(kind, plan["steps"] + 1, b, plan, device)
                    if kind == "dense":
                        flops = (
                            estimate_flops(cfg.model, frames=plan["frames"], text_tokens=plan["text"]).per_sample * b
                        )
                    else:
                        flops = batch_flops(cfg, batches, plan)
                    seconds, _, memory = train_steps(cfg, batches, device, bf16, plan["steps"])
                except torch.cuda.OutOfMemoryError:
                    rows.append(
                        {"size": size, "variant": variant, "batches": kind, "batch": b, "error": "out of memory"}
                    )
                    torch.cuda.empty_cache()
                    continue
                row = {
                    "size": size,
                    "variant": variant,
                    "batches": kind,
                    **batch_stats(batches),
                    "llm": cfg.model.llm,
                    "arch": cfg.model.arch,
                    "batch": b,
                    "checkpointing": cfg.model.gradient_checkpointing,
                    "step_sec": seconds,
                    "samples_per_sec": b / seconds,
                    "flops_per_sec": flops / seconds,
                    "mfu": flops / seconds / peak if peak else None,
                    "peak_mem_gib": memory,
                }
                rows.append(row)
                log(
                    f"  step {size:>5} {variant:<12} {kind:<6} batch {b:>3}: {seconds * 1e3:8.1f} ms, "
                    f"{row['samples_per_sec']:7.1f} samples/s, MFU {_pct(row['mfu'])}, peak {_gib(memory)}"
                )
    return rows


def check_compile(plan, device, bf16, log, kind: str = "padded") -> dict:
    """Eager vs compiled step (first size, foveated) on `kind` batches, with dynamo's graph counts
    over the compiled run (a padded batch's frame and target counts vary, so shapes change)."""
    from torch._dynamo.utils import counters

    name = next(iter(plan["configs"].values()))
    cfg = run_config(name, plan, {})
    batches = step_batches(kind, plan["steps"] + 1, cfg.train.batch_size, plan, device)
    eager, _, _ = train_steps(cfg, batches, device, bf16, plan["steps"])
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled, _, _ = train_steps(cfg, batches, device, bf16, plan["steps"], compile_backend=plan["compile_backend"])
    except Exception as exc:  # a compiler failure is a result to report, not a reason to stop the check
        log(f"  torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return {"batches": kind, "eager_step_sec": eager, "error": error}
    graphs = int(counters["stats"]["unique_graphs"])
    recompiles = max(graphs - 1, 0)  # `_forward` compiles as one full graph: each more graph is a recompile
    log(
        f"  compile ({kind}): eager {eager * 1e3:.1f} ms, compiled {compiled * 1e3:.1f} ms ({eager / compiled:.2f}x); "
        f"{graphs} graphs ({recompiles} recompiles), {len(batches)} distinct batches over {plan['steps'] + 1} steps"
    )
    return {
        "backend": plan["compile_backend"],
        "batches": kind,
        "steps": plan["steps"] + 1,
        "distinct_batches": len(batches),
        "eager_step_sec": eager,
        "compiled_step_sec": compiled,
        "speedup": eager / compiled,
        "unique_graphs": graphs,
        "recompiles": recompiles,
    }


def check_parity(plan, device, log) -> dict:
    """The same weights and batch trained in fp32 and in bf16 autocast: per-step relative loss gap."""
    name = next(iter(plan["configs"].values()))
    cfg = run_config(name, plan, {})
    batch = [make_batch(cfg.train.batch_size, plan, device, seed=1)]
    _, fp32, _ = train_steps(cfg, batch, device, False, plan["parity_steps"], seed=1)
    _, bf16, _ = train_steps(cfg, batch, device, True, plan["parity_steps"], seed=1)  # CPU autocast has bf16 too
    gaps = [abs(a - b) / abs(a) for a, b in zip(fp32, bf16)]
    log(f"  bf16 vs fp32 loss: max relative gap {max(gaps):.4f} over {len(gaps)} steps")
    return {"fp32_losses": fp32, "bf16_losses": bf16, "max_relative_gap": max(gaps)}


def check_loader(plan, log) -> list[dict]:
    from fvlm.data.loader import build_loader
    from fvlm.data.synth import generate_synthetic
    from fvlm.model.build import build_tokenizer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        n = plan["loader_samples"]
        generate_synthetic(
            Path(tmp) / "set",
            videos=n,
            images=n // 4,
            texts=n // 4,
            frames=plan["frames"],
            size=plan["image"],
            seed=0,
            val=8,
            probe=2,
            bench=4,
        )
        for workers in plan["loader_workers"]:
            cfg = load_config(
                "tiny",
                {
                    "data.train": str(Path(tmp) / "set" / "train"),
                    "data.num_workers": workers,
                    "model.image_size": plan["image"],
                    "data.max_frames": plan["frames"],
                    "train.batch_size": 8,
                },
            )
            loader = build_loader(cfg, "train", build_tokenizer(cfg.model))
            batches = iter(loader)
            next(batches)  # workers start
            began, samples = time.perf_counter(), 0
            for _ in range(max(2, n // 8)):
                samples += next(batches)["input_ids"].shape[0]
            rate = samples / (time.perf_counter() - began)
            rows.append({"workers": workers, "samples_per_sec": rate, "frames_per_sec": rate * plan["frames"]})
            log(f"  loader {plan['image']} px, {workers} workers: {rate:7.1f} samples/s")
    return rows


MANUAL_BUCKET = 1 << 24  # elements per flat all-reduce of the manual baseline


def _sum_gradients(params: list) -> None:
    """The manual baseline: every `.grad` summed over ranks after backward, in flat buckets."""
    import torch.distributed as dist

    buckets: list[list] = [[]]
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        if sum(g.numel() for g in buckets[-1]) >= MANUAL_BUCKET:
            buckets.append([])
        buckets[-1].append(param.grad)
    for grads in buckets:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        torch._foreach_copy_(grads, [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)])


def _allreduce_worker(rank: int, world: int, port: int, plan: dict, mode: str, steps: int, queue) -> None:
    import torch.distributed as dist

    from fvlm.training.dist import Dist
    from fvlm.training.engine import Engine

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.device_count() >= world
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    name = next(iter(plan["configs"].values()))
    cfg = run_config(name, plan, {})
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    ddp = Engine(model, Dist(rank=rank, world_size=world, local_rank=rank, device=device)) if mode == "ddp" else None
    batch = make_batch(cfg.train.batch_size, plan, device, seed=rank)
    times = []
    for i in range(steps + 1):
        sync(device)
        began = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = (ddp or model)(batch, compute_coarse=False).loss
        loss.backward()
        if mode == "manual":
            _sum_gradients(params)
        for p in params:
            p.grad = None
        sync(device)
        if i:
            times.append(time.perf_counter() - began)
    if rank == 0:
        queue.put(statistics.median(times))
    # Teardown in order: both ranks past their last collective, then DDP's reducer (it holds gloo
    # work objects with tensors) gone, then the group. A rank that tore its group down while gloo's
    # threads still held work aborted now and then at exit ("terminate called without an active
    # exception", SIGABRT in the reduced check under pytest).
    dist.barrier()
    del ddp, model, params
    gc.collect()
    dist.destroy_process_group()


def check_allreduce(plan, log) -> dict:
    import socket

    import torch.multiprocessing as mp

    world = 2
    backend = "nccl" if torch.cuda.device_count() >= world else "gloo (CPU proxy)"
    if backend != "nccl" and plan["image"] != REDUCED["image"]:
        # One GPU: the two ranks run on the CPU, where a paper-shaped step takes minutes. The proxy
        # then runs at the reduced shapes; it checks the code path, its times mean nothing.
        plan, backend = REDUCED, "gloo (CPU proxy, reduced shapes)"
    context = mp.get_context("spawn")
    result = {"backend": backend}
    for mode in ("manual", "ddp"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        queue = context.Queue()
        mp.start_processes(
            _allreduce_worker,
            args=(world, port, plan, mode, plan["steps"], queue),
            nprocs=world,
            start_method="spawn",
            join=True,
        )
        result[f"{mode}_step_sec"] = queue.get()
    result["manual_over_ddp"] = result["manual_step_sec"] / result["ddp_step_sec"]
    log(
        f"  all-reduce on {backend}: manual {result['manual_step_sec'] * 1e3:.1f} ms, DDP "
        f"{result['ddp_step_sec'] * 1e3:.1f} ms per step ({result['manual_over_ddp']:.2f}x)"
    )
    return result


def _pct(v):
    return "  n/a" if v is None else f"{v:5.1%}"


def _gib(v):
    return "n/a" if v is None else f"{v:.1f} GiB"


def markdown(report: dict) -> str:
    lines = [
        f"# GPU check: {report['device']} ({'reduced, CPU' if report['reduced'] else 'full'})",
        "",
        f"torch {report['torch']}, {report['precision']}, peak {report['peak_source']}; {report['seconds']:.0f} s",
        "",
        "Batches: `padded` are shaped like the loader's (random real frames per sample, valid first;"
        " random text lengths, right-padded; the batch indices of fvlm.model.batch_index), their MFU"
        " counted on each sample's real frames and targets; `dense` are all real (every mask all ones).",
        "",
        "| size | variant | batches | real frames / text | batch | step (ms) | samples/s | MFU | peak memory |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["steps"]:
        head = f"| {r['size']} | {r['variant']} | {r['batches']} |"
        if "error" in r:
            lines.append(f"{head} | {r['batch']} | {r['error']} | | | |")
        else:
            lines.append(
                f"{head} {r['real_frames']:.0%} / {r['real_text']:.0%} | {r['batch']} | {r['step_sec'] * 1e3:.1f} | "
                f"{r['samples_per_sec']:.1f} | {_pct(r['mfu']).strip()} | {_gib(r['peak_mem_gib'])} |"
            )
    lines += ["", "| check | result |", "|---|---|"]
    for c in report["compile"]:
        lines.append(
            f"| torch.compile, {c.get('backend', '?')} backend, {c['batches']} batches (step, eager / compiled) | "
            + (
                f"{c['eager_step_sec'] * 1e3:.1f} / {c['compiled_step_sec'] * 1e3:.1f} ms ({c['speedup']:.2f}x); "
                f"{c['unique_graphs']} graphs ({c['recompiles']} recompiles), {c['distinct_batches']} distinct batches "
                f"over {c['steps']} steps |"
                if "speedup" in c
                else f"failed: {c['error']} |"
            )
        )
    p = report["parity"]
    lines.append(
        f"| bf16 vs fp32 loss, max relative gap over {len(p['fp32_losses'])} steps | {p['max_relative_gap']:.4f} |"
    )
    for r in report["loader"]:
        lines.append(f"| loader, {r['workers']} workers | {r['samples_per_sec']:.1f} samples/s |")
    a = report["allreduce"]
    lines.append(
        f"| gradient all-reduce on {a['backend']}: manual / DDP step | {a['manual_step_sec'] * 1e3:.1f} / "
        f"{a['ddp_step_sec'] * 1e3:.1f} ms ({a['manual_over_ddp']:.2f}x) |"
    )
    return "\n".join(lines) + "\n"


def record_mfu(report: dict, path: Path) -> None:
    """Adds this device's measured MFU per model shape to the file the cost estimate reads."""
    records = json.loads(path.read_text()) if path.is_file() else []
    fresh = [
        {
            "device": report["device"],
            "llm": r["llm"],
            "arch": r["arch"],
            "mfu": r["mfu"],
            "batch": r["batch"],
            "measured": report["date"],
        }
        for r in report["steps"]
        if r.get("mfu") and r["variant"] != "coarse_only" and r["batches"] == "padded"
    ]
    keys = {(r["device"], r["llm"], r["arch"]) for r in fresh}
    records = [r for r in records if (r.get("device"), r.get("llm"), r.get("arch")) not in keys] + fresh
    path.write_text(json.dumps(records, indent=1) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reduced", action="store_true", help="tiny shapes on the CPU (what CI runs)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--sizes", help="comma-separated subset of 135m,360m,1.7b")
    parser.add_argument("--steps", type=int, help="timed steps per measurement")
    parser.add_argument(
        "--dense", action="store_true", help="also time all-ones batches (every frame and token real), for comparison"
    )
    parser.add_argument("--no-record", action="store_true", help="do not update benchmarks/mfu_measured.json")
    args = parser.parse_args(argv)
    plan = dict(REDUCED if args.reduced else FULL)
    if args.sizes:
        unknown = set(args.sizes.split(",")) - set(plan["configs"])
        if unknown:
            parser.error(f"--sizes: unknown {sorted(unknown)}; choose from {sorted(plan['configs'])}")
        plan["configs"] = {k: v for k, v in plan["configs"].items() if k in args.sizes.split(",")}
    if args.steps:
        plan["steps"] = args.steps
    cuda = torch.cuda.is_available() and not args.reduced
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(1)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    bf16 = cuda and torch.cuda.is_bf16_supported()
    peak, source = peak_flops(None, name if cuda else None, bf16)
    out = args.out or HERE / "gpu_check" / name.replace(" ", "_")
    out.mkdir(parents=True, exist_ok=True)
    kinds = ("padded", "dense") if args.dense else ("padded",)
    began = time.perf_counter()
    log = lambda text: print(text, flush=True)  # noqa: E731
    log(f"GPU check on {name} ({'reduced' if args.reduced else 'full'}), peak {source}")
    report = {
        "device": name,
        "reduced": args.reduced,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "precision": "bf16 autocast" if bf16 else "fp32",
        "peak_flops": peak,
        "peak_source": source,
        "plan": {k: v for k, v in plan.items() if k != "configs"} | {"configs": plan["configs"]},
        "batches": list(kinds),
    }
    # The JSON is rewritten after each part, so that a check cut short by a machine's time limit still
    # leaves what it measured.
    parts = {
        "steps": lambda: check_steps(plan, device, bf16, peak, log, kinds),
        "compile": lambda: [check_compile(plan, device, bf16, log, kind) for kind in kinds],
        "parity": lambda: check_parity(plan, device, log),
        "loader": lambda: check_loader(plan, log),
        "allreduce": lambda: check_allreduce(plan, log),
    }
    for part, check in parts.items():
        report[part] = check()
        report["seconds"] = time.perf_counter() - began
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))
    if cuda and not args.no_record:
        record_mfu(report, HERE / "mfu_measured.json")
    log(f"wrote {out / 'gpu_check.json'} and gpu_check.md in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
