"""The GPU check: everything the plan's runs need to know about a GPU, measured in a few minutes.

    python benchmarks/gpu_check.py [--out DIR] [--sizes 135m,360m,1.7b] [--steps N] [--dense] [--no-record]
                                   [--parts steps,compile,...] [--baseline OLD_CHECKOUT]
    python benchmarks/gpu_check.py --reduced [--out DIR]      # the CPU-sized version CI runs

On one H100/H200 it takes about 5-8 minutes. With random weights of the paper shapes (SmolLM2
135M / 360M / 1.7B + DINOv2-small at 224 px, 16 frames and 484 text tokens per sample, the plan's
sample; each size's shipped config, so its per-GPU batch and gradient checkpointing) it measures:

1. step time, MFU and peak memory of a training step (forward, backward, AdamW) for the foveated
   model (coarse_fine), coarse-only and the 16-token multi-token baseline, in bf16 as the trainer
   runs it (bf16 weights, fp32 masters; `--precision bf16-autocast`: the older autocast mode), with
   the GPU kernels (and copies) one step launches, counted by torch.profiler;
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

`--baseline DIR` measures part 1 (and part 2, when it runs) a second time with another checkout's
code: DIR holds an `fvlm/` package, which a child process imports in place of this tree's (DIR first
on PYTHONPATH) while timing with this script's code, on the same batches (made here, with the same
seeds, and handed over in a file) and the same GPU, right after this tree's rows. Where the old code
cannot take the batches' index keys, it is timed without them; where it cannot run at all, the
report says why. gpu_check.md then has a table of old and new samples/s and MFU per shape (both MFUs
count the same FLOPs: this tree's counter on the same batches). `benchmarks/prepare_baseline.sh
[REF]` exports a commit's `fvlm/` into `gpu_baseline/` (untracked, not ignored, so the device
machine's copy of the tree carries it; delete it after the run) and prints the command to run.
`--parts` runs a subset of the parts (steps,compile,cudagraphs,parity,loader,allreduce), to spend
less GPU time. `cudagraphs` times the 135M foveated step eager, compiled and compiled into CUDA graphs
(`train.cuda_graphs`) on batches padded to the shape ladder (`train.static_shapes`), the same steps
from the same weights in each mode, and reports how far their losses drift apart.

`--reduced` runs the same code on tiny shapes at 32 px on the CPU in under a minute, so that the
script cannot rot between GPU sessions; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
WORKER_FLAG = "--baseline-worker"
# A baseline worker (see --baseline) imports the other checkout's fvlm, which its parent put first on
# PYTHONPATH; everyone else imports this tree's. The worker needs only the three imports below from
# fvlm (the rest are imported where used), so that an older fvlm can be measured too.
if WORKER_FLAG not in sys.argv:
    sys.path.insert(0, str(HERE.parent))

from fvlm.config import load_config  # noqa: E402
from fvlm.model.build import build_model  # noqa: E402
from fvlm.training.optim import build_optimizer  # noqa: E402

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


def padded_batches(n: int, b: int, plan: dict, seed: int = 0, static: bool = False) -> list[dict]:
    """`n` batches (on the CPU) as the loader's collate makes them: each sample a random number of real
    frames (1..T, valid first, the rest zero), a random text length (T/2..N tokens, right-padded),
    targets a random run of its text, and the host-side indices of fvlm.model.batch_index (what the
    trainer's sync-free step uses); `static`: the frame and target lists padded to the shape ladder
    (`train.static_shapes`; frames and text are padded to T and N already)."""
    from fvlm.model.batch_index import random_padded_batch

    g = torch.Generator().manual_seed(seed)
    size, t, length = plan["image"], plan["frames"], plan["text"]
    if static:
        return [random_padded_batch(g, b, t, length, size, static=True) for _ in range(n)]
    return [random_padded_batch(g, b, t, length, size) for _ in range(n)]


def host_batches(kind: str, n: int, b: int, plan: dict) -> list[dict]:
    """The batches a timed run cycles through, on the CPU: `padded` (realistic, distinct) or `dense`
    (one all-ones batch)."""
    return padded_batches(n, b, plan) if kind == "padded" else [make_batch(b, plan, "cpu")]


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def step_batches(kind: str, n: int, b: int, plan: dict, device) -> list[dict]:
    return [to_device(x, device) for x in host_batches(kind, n, b, plan)]


def batch_stats(batches: list[dict]) -> dict:
    """How much of the batches is real: fraction of frames, text tokens and target tokens."""
    frames = sum(int(x["frame_mask"].sum()) for x in batches) / sum(x["frame_mask"].numel() for x in batches)
    text = sum(int(x["attention_mask"].sum()) for x in batches) / sum(x["attention_mask"].numel() for x in batches)
    targets = sum(int(x["loss_mask"].sum()) for x in batches) / sum(x["loss_mask"].numel() for x in batches)
    return {"real_frames": frames, "real_text": text, "real_targets": targets, "distinct_batches": len(batches)}


def batch_flops(cfg, batches: list[dict], plan: dict) -> float:
    """Training FLOPs of one batch, averaged over `batches`: each sample at its own real frames and
    targets (the LLM runs over the padded text length)."""
    from fvlm.model.flops import estimate_flops

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


def train_steps(
    cfg,
    batches,
    device,
    precision: str,
    steps: int,
    compile_backend: str | None = None,
    seed: int = 0,
    cuda_graphs: bool = False,
    warmup: int = 1,
):
    """(median seconds per step, losses, peak GiB, GPU kernels per step): forward + backward + AdamW,
    step i on `batches[i % len(batches)]`, the first `warmup` steps untimed (compilation; with
    `cuda_graphs` each shape is run once, then captured, then replayed). `precision` as
    `train.precision` names it: `bf16` (bf16 weights, fp32 masters in the optimizer: what the trainer
    runs on a GPU), `bf16-autocast` or `fp32`. Kernels: the GPU kernels and copies of one more step,
    counted by torch.profiler (None on a CPU); with one graph and fused kernels this is what a
    launch-bound step pays for."""
    torch.manual_seed(seed)
    model = build_model(cfg.model).to(device)
    model.train()
    masters = None
    if precision == "bf16":
        from fvlm.training.precision import MasterWeights  # an old baseline without it cannot run bf16

        masters = MasterWeights(model, [p for p in model.parameters() if p.requires_grad])
    if compile_backend:
        from fvlm.model.build import compile_model

        if cuda_graphs:
            compile_model(model, backend=compile_backend, cuda_graphs=True)
        else:  # as an old baseline's compile_model, which has no cuda_graphs argument, is called
            compile_model(model, backend=compile_backend)
    optimizer = build_optimizer(model, cfg.optim, masters) if masters is not None else build_optimizer(model, cfg.optim)
    if cuda_graphs:
        from fvlm.training.trainer import own_gradients  # only this tree's code takes cuda_graphs

        trainable = [p for p in model.parameters() if p.requires_grad]
    losses, times = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step(batch) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-autocast"):
            loss = model(batch, compute_coarse=cfg.model.lambda_coarse > 0).loss
        loss.backward()
        if masters is not None:
            masters.accumulate_grads()
        elif cuda_graphs:
            own_gradients(trainable)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if masters is not None:
            masters.publish()
        return loss

    for i in range(warmup + steps):
        sync(device)
        began = time.perf_counter()
        loss = step(batches[i % len(batches)])
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - began)
        losses.append(loss.item())
    kernels = None
    if device.type == "cuda":
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step(batches[(warmup + steps) % len(batches)])
            sync(device)
        kernels = sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    model = optimizer = masters = None  # frees the step's memory (the closure above holds these names)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return statistics.median(times), losses, peak, kernels


def step_jobs(plan: dict, kinds) -> list[tuple]:
    """(size, config name, batches kind, variant, overrides) of each row of part 1, in order."""
    return [
        (size, name, kind, variant, overrides)
        for size, name in plan["configs"].items()
        for kind in kinds
        for variant, overrides in VARIANTS.items()
    ]


def step_flops(cfg, kind: str, batches: list[dict], plan: dict) -> float:
    """Training FLOPs of one step: every frame and token of a dense batch, each sample's real ones of a padded one."""
    if kind == "dense":
        from fvlm.model.flops import estimate_flops

        return estimate_flops(cfg.model, frames=plan["frames"], text_tokens=plan["text"]).per_sample * len(
            batches[0]["input_ids"]
        )
    return batch_flops(cfg, batches, plan)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _step_line(who: str, r: dict) -> str:
    head = f"  {who}step {r['size']:>5} {r['variant']:<12} {r['batches']:<6} batch {r['batch']:>3}:"
    if "error" in r:
        return f"{head} {r['error']}"
    return (
        f"{head} {r['step_sec'] * 1e3:8.1f} ms, {r['samples_per_sec']:7.1f} samples/s, MFU {_pct(r['mfu'])}, "
        f"peak {_gib(r['peak_mem_gib'])}"
    )


def check_steps(plan, device, precision, peak, log, kinds=("padded",)) -> list[dict]:
    rows = []
    for size, name, kind, variant, overrides in step_jobs(plan, kinds):
        cfg = run_config(name, plan, overrides)
        b = cfg.train.batch_size
        try:
            batches = step_batches(kind, plan["steps"] + 1, b, plan, device)
            flops = step_flops(cfg, kind, batches, plan)
            seconds, losses, memory, kernels = train_steps(cfg, batches, device, precision, plan["steps"])
        except torch.cuda.OutOfMemoryError:
            rows.append({"size": size, "variant": variant, "batches": kind, "batch": b, "error": "out of memory"})
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
            "gpu_kernels_per_step": kernels,
            "losses": losses,
        }
        rows.append(row)
        log(_step_line("", row))
    return rows


def compare_compile(cfg, batches, device, precision, plan, log, kind: str, who: str = "") -> dict:
    """Eager vs compiled step of `cfg` cycling through `batches`, with dynamo's graph counts over the
    compiled run (a padded batch's frame and target counts vary, so shapes change)."""
    from torch._dynamo.utils import counters

    eager, _, _, eager_kernels = train_steps(cfg, batches, device, precision, plan["steps"])
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled, _, _, compiled_kernels = train_steps(
            cfg, batches, device, precision, plan["steps"], compile_backend=plan["compile_backend"]
        )
    except Exception as exc:  # a compiler failure is a result to report, not a reason to stop the check
        log(f"  {who}torch.compile failed: {_one_line(exc)}")
        return {"batches": kind, "eager_step_sec": eager, "error": _one_line(exc)}
    graphs = int(counters["stats"]["unique_graphs"])
    recompiles = max(graphs - 1, 0)  # `_forward` compiles as one full graph: each more graph is a recompile
    log(
        f"  {who}compile ({kind}): eager {eager * 1e3:.1f} ms, compiled {compiled * 1e3:.1f} ms "
        f"({eager / compiled:.2f}x); {graphs} graphs ({recompiles} recompiles), {len(batches)} distinct batches "
        f"over {plan['steps'] + 1} steps"
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
        "eager_gpu_kernels_per_step": eager_kernels,
        "compiled_gpu_kernels_per_step": compiled_kernels,
    }


def check_compile(plan, device, precision, log, kind: str = "padded") -> dict:
    """Eager vs compiled step (first size, foveated) on `kind` batches."""
    cfg = run_config(next(iter(plan["configs"].values())), plan, {})
    batches = step_batches(kind, plan["steps"] + 1, cfg.train.batch_size, plan, device)
    return compare_compile(cfg, batches, device, precision, plan, log, kind)


def check_cuda_graphs(plan, device, precision, log) -> dict:
    """train.cuda_graphs: the step (first size, foveated) eager, compiled, and compiled into CUDA graphs
    (compile's "reduce-overhead"), on padded batches whose frame and target lists are on the shape
    ladder (`train.static_shapes`). Every mode runs the same steps from the same weights, so the
    losses must agree (bf16 rounding apart); warm-up covers each shape's run, capture and first
    replay. On a CPU the CUDA graph row is left out (nothing to capture)."""
    from torch._dynamo.utils import counters

    cfg = run_config(next(iter(plan["configs"].values())), plan, {})
    batches = [to_device(x, device) for x in padded_batches(plan["steps"] + 1, cfg.train.batch_size, plan, static=True)]
    shapes = len({(x["frame_rows"].shape[0], x["target_rows"].shape[0]) for x in batches})
    warmup = 1 + 2 * len(batches)  # the same for every mode: the same training trajectory
    modes = {"eager": {}, "compiled": {"compile_backend": plan["compile_backend"]}}
    if device.type == "cuda":
        modes["cuda_graphs"] = {"compile_backend": plan["compile_backend"], "cuda_graphs": True}
    result: dict = {"batches": "padded, static", "distinct_batches": len(batches), "distinct_shapes": shapes}
    losses = {}
    for mode, options in modes.items():
        torch._dynamo.reset()
        counters.clear()
        try:
            seconds, losses[mode], _, kernels = train_steps(
                cfg, batches, device, precision, plan["steps"], warmup=warmup, **options
            )
        except Exception as exc:  # a compiler or capture failure is a result to report
            log(f"  cuda graphs: {mode} failed: {_one_line(exc)}")
            result[mode] = {"error": _one_line(exc)}
            continue
        graphs = int(counters["stats"]["unique_graphs"]) if options else None
        result[mode] = {"step_sec": seconds, "gpu_kernels_per_step": kernels, "unique_graphs": graphs}
        if mode != "eager" and "eager" in losses:
            result[mode]["max_loss_diff"] = max(abs(a - b) for a, b in zip(losses["eager"], losses[mode]))
    timed = {m: r["step_sec"] for m, r in result.items() if isinstance(r, dict) and "step_sec" in r}
    log(
        "  cuda graphs (static shapes, "
        + f"{shapes} shapes): "
        + ", ".join(f"{m} {sec * 1e3:.1f} ms" for m, sec in timed.items())
        + "".join(f"; {m} loss diff {result[m]['max_loss_diff']:.2g}" for m in timed if "max_loss_diff" in result[m])
    )
    return result


# ----------------------------------------------------------------------------- the baseline

# The keys of a batch before fvlm.model.batch_index: what an old model is timed on when it fails on more.
PLAIN_KEYS = ("frames", "frame_mask", "input_ids", "attention_mask", "loss_mask")
MARKER = ".fvlm-baseline"  # written by benchmarks/prepare_baseline.sh: the ref and commit exported


def code_version(folder: Path) -> str | None:
    """The commit of a checkout: the export marker of prepare_baseline.sh, else git's HEAD, else None."""
    marker = folder / MARKER
    if marker.is_file():
        fields = dict(line.split(": ", 1) for line in marker.read_text().splitlines() if ": " in line)
        if "commit" in fields:
            return f"{fields['commit'][:12]} ({fields.get('ref', '?')})"
    try:
        done = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--", "fvlm"], capture_output=True)
    return done.stdout.strip() + (" with uncommitted changes" if dirty.stdout.strip() else "")


def _without_index_keys(batches: list[dict]) -> list[dict]:
    return [{k: v for k, v in batch.items() if k in PLAIN_KEYS} for batch in batches]


def _run_old(run, batches: list[dict], state: dict):
    """`run(batches)` with the old code: on the full batches, or, where it fails on them, on the same
    batches without the keys it may not know (said once in `state['notes']`; later runs skip them)."""
    if not state["strip"]:
        try:
            return run(batches)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:
            extra = sorted(set(batches[0]) - set(PLAIN_KEYS))
            if not extra:
                raise
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            try:
                done = run(_without_index_keys(batches))
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception:
                raise exc from None  # the keys were not the trouble: report the first failure
            state["strip"] = True
            state["notes"].append(
                f"the baseline failed on batches with {', '.join(extra)} ({_one_line(exc)}); "
                "it was timed on the same batches without those keys"
            )
            return done
    return run(_without_index_keys(batches))


def _foreign_modules(home: Path) -> list[str]:
    """The fvlm modules loaded from outside `home`: an editable install's import hook can fill in a
    module the baseline lacks with another checkout's."""
    return sorted(
        f"{name} ({module.__file__})"
        for name, module in list(sys.modules.items())
        if (name == "fvlm" or name.startswith("fvlm."))
        and getattr(module, "__file__", None)
        and not Path(module.__file__).resolve().is_relative_to(home)
    )


def baseline_worker(spec_path: Path) -> int:
    """The child process of --baseline: times the jobs of `spec_path` with the fvlm found first on
    PYTHONPATH (the baseline's), writing what it measured to the spec's `out` after each job."""
    import fvlm

    spec = json.loads(spec_path.read_text())
    plan, precision, device = spec["plan"], spec["precision"], torch.device(spec["device"])
    if device.type == "cpu":
        torch.set_num_threads(1)
    home = Path(fvlm.__file__).resolve().parent
    if not home.is_relative_to(Path(spec["baseline"]).resolve()):
        print(f"fvlm was imported from {home}, not from the baseline {spec['baseline']}", file=sys.stderr)
        return 2
    if _foreign_modules(home):
        print(f"not the baseline's: {', '.join(_foreign_modules(home))}", file=sys.stderr)
        return 2
    state: dict = {"strip": False, "notes": []}
    if importlib.util.find_spec("fvlm.model.batch_index") is None:
        state["notes"].append(
            "the baseline has no fvlm.model.batch_index: the batches' index keys mean nothing to it "
            "(its model finds frames and targets from the masks)"
        )
    result: dict = {"fvlm": str(home), "notes": state["notes"], "steps": [], "compile": []}
    out = Path(spec["out"])

    def save() -> None:
        out.with_suffix(".tmp").write_text(json.dumps(result, default=str))
        os.replace(out.with_suffix(".tmp"), out)

    log = lambda text: print(text, flush=True)  # noqa: E731
    for job in spec["steps"]:
        row = {k: job[k] for k in ("size", "variant", "batches", "batch")}
        try:
            cfg = run_config(job["config"], plan, job["overrides"])
            batches = [to_device(b, device) for b in torch.load(job["file"])]
            seconds, losses, memory, kernels = _run_old(
                lambda bs: train_steps(cfg, bs, device, precision, plan["steps"]), batches, state
            )
            row |= {"step_sec": seconds, "losses": losses, "peak_mem_gib": memory, "gpu_kernels_per_step": kernels}
            row |= {"samples_per_sec": job["batch"] / seconds, "flops_per_sec": job["flops"] / seconds}
            row["mfu"] = job["flops"] / seconds / spec["peak"] if spec["peak"] else None
        except torch.cuda.OutOfMemoryError:
            row["error"] = "out of memory"
            torch.cuda.empty_cache()
        except Exception as exc:  # old code that cannot run a shape is a result, not a reason to stop
            row["error"] = _one_line(exc)
        result["steps"].append(row)
        save()
        log(_step_line("baseline ", row))
    for job in spec["compile"]:
        try:
            import fvlm.model.build

            if not hasattr(fvlm.model.build, "compile_model"):
                raise RuntimeError("the baseline has no fvlm.model.build.compile_model")
            cfg = run_config(job["config"], plan, job["overrides"])
            batches = [to_device(b, device) for b in torch.load(job["file"])]
            kind = job["batches"]
            found = _run_old(
                lambda bs: compare_compile(cfg, bs, device, precision, plan, log, kind, "baseline "), batches, state
            )
        except Exception as exc:
            found = {"batches": job["batches"], "error": _one_line(exc)}
            log(f"  baseline compile ({job['batches']}): {found['error']}")
        result["compile"].append(found)
        save()
    if _foreign_modules(home):
        result["notes"].append(f"its rows mix in code from outside the baseline: {', '.join(_foreign_modules(home))}")
        save()
    return 0


def check_baseline(plan, device, precision, peak, log, kinds, parts, baseline: Path, new: dict) -> dict:
    """Part 1 (and 2) again with the fvlm of `baseline`, in a child process, on the same batches:
    made here as for this tree's rows and handed over in files."""
    found: dict = {"dir": str(baseline), "commit": code_version(baseline), "notes": [], "steps": [], "compile": []}
    log(f"  baseline: {baseline} ({found['commit'] or 'commit unknown'})")
    with tempfile.TemporaryDirectory() as tmp:
        files: dict = {}

        def batch_file(size: str, kind: str, b: int) -> tuple[str, list[dict]]:
            if (size, kind, b) not in files:
                batches = host_batches(kind, plan["steps"] + 1, b, plan)
                path = Path(tmp) / f"batches-{size}-{kind}-{b}.pt"
                torch.save(batches, path)
                files[size, kind, b] = (str(path), batches)
            return files[size, kind, b]

        steps, compiles = [], []
        for size, name, kind, variant, overrides in step_jobs(plan, kinds) if "steps" in parts else []:
            cfg = run_config(name, plan, overrides)
            b = cfg.train.batch_size
            path, batches = batch_file(size, kind, b)
            flops = step_flops(cfg, kind, batches, plan)
            steps.append(
                {
                    "size": size,
                    "variant": variant,
                    "batches": kind,
                    "batch": b,
                    "config": name,
                    # The old config may have another batch size: the same batches need this one.
                    "overrides": {**overrides, "train.batch_size": b},
                    "file": path,
                    "flops": flops,
                }
            )
        for kind in kinds if "compile" in parts else []:
            size, name = next(iter(plan["configs"].items()))
            b = run_config(name, plan, {}).train.batch_size
            compiles.append(
                {
                    "batches": kind,
                    "config": name,
                    "overrides": {"train.batch_size": b},
                    "file": batch_file(size, kind, b)[0],
                }
            )
        out = Path(tmp) / "result.json"
        spec = {
            "baseline": str(baseline),
            "plan": plan,
            "precision": precision,
            "peak": peak,
            "device": device.type,
            "steps": steps,
            "compile": compiles,
            "out": str(out),
        }
        (Path(tmp) / "spec.json").write_text(json.dumps(spec, default=str))
        path = os.pathsep.join([str(baseline.resolve()), *filter(None, [os.environ.get("PYTHONPATH")])])
        done = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), WORKER_FLAG, str(Path(tmp) / "spec.json")],
            env={**os.environ, "PYTHONPATH": path},
            stderr=subprocess.PIPE,
            text=True,
        )
        if out.is_file():
            found |= json.loads(out.read_text())
        if done.returncode != 0:
            tail = [line for line in done.stderr.strip().splitlines() if line.strip()]
            found["error"] = f"the baseline's process exited with {done.returncode}: {tail[-1] if tail else ''}"
            log(f"  baseline: {found['error']}")
    fresh = {(r["size"], r["variant"], r["batches"]): r for r in new.get("steps", [])}
    for row in found["steps"]:
        mine = fresh.get((row["size"], row["variant"], row["batches"]), {})
        if "samples_per_sec" in row and "samples_per_sec" in mine:
            row["new_over_old"] = mine["samples_per_sec"] / row["samples_per_sec"]
    return found


def check_parity(plan, device, precision: str, log) -> dict:
    """The same weights and batch trained in fp32 and in the check's bf16 mode (bf16 autocast on a
    CPU, which has it too): per-step relative loss gap."""
    name = next(iter(plan["configs"].values()))
    cfg = run_config(name, plan, {})
    batch = [make_batch(cfg.train.batch_size, plan, device, seed=1)]
    mode = precision if precision != "fp32" else "bf16-autocast"
    _, fp32, _, _ = train_steps(cfg, batch, device, "fp32", plan["parity_steps"], seed=1)
    _, bf16, _, _ = train_steps(cfg, batch, device, mode, plan["parity_steps"], seed=1)
    gaps = [abs(a - b) / abs(a) for a, b in zip(fp32, bf16)]
    log(f"  {mode} vs fp32 loss: max relative gap {max(gaps):.4f} over {len(gaps)} steps")
    return {"mode": mode, "fp32_losses": fp32, "bf16_losses": bf16, "max_relative_gap": max(gaps)}


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


def _count(v):
    return "n/a" if v is None else f"{v:,}"


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
        "| size | variant | batches | real frames / text | batch | step (ms) | samples/s | MFU | peak memory"
        " | GPU kernels / step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.get("steps", []):
        head = f"| {r['size']} | {r['variant']} | {r['batches']} |"
        if "error" in r:
            lines.append(f"{head} | {r['batch']} | {r['error']} | | | | |")
        else:
            lines.append(
                f"{head} {r['real_frames']:.0%} / {r['real_text']:.0%} | {r['batch']} | {r['step_sec'] * 1e3:.1f} | "
                f"{r['samples_per_sec']:.1f} | {_pct(r['mfu']).strip()} | {_gib(r['peak_mem_gib'])} | "
                f"{_count(r.get('gpu_kernels_per_step'))} |"
            )
    lines += ["", "| check | result |", "|---|---|"]
    for c in report.get("compile", []):
        lines.append(
            f"| torch.compile, {c.get('backend', '?')} backend, {c['batches']} batches (step, eager / compiled) | "
            + (
                f"{c['eager_step_sec'] * 1e3:.1f} / {c['compiled_step_sec'] * 1e3:.1f} ms ({c['speedup']:.2f}x); "
                f"{c['unique_graphs']} graphs ({c['recompiles']} recompiles), {c['distinct_batches']} distinct batches "
                f"over {c['steps']} steps; GPU kernels per step {_count(c.get('eager_gpu_kernels_per_step'))} / "
                f"{_count(c.get('compiled_gpu_kernels_per_step'))} |"
                if "speedup" in c
                else f"failed: {c['error']} |"
            )
        )
    if "cudagraphs" in report:
        g = report["cudagraphs"]
        for mode in ("eager", "compiled", "cuda_graphs"):
            r = g.get(mode)
            if r is None:
                continue
            cell = (
                f"failed: {r['error']}"
                if "error" in r
                else f"{r['step_sec'] * 1e3:.1f} ms; GPU kernels per step {_count(r.get('gpu_kernels_per_step'))}"
                + (f"; {r['unique_graphs']} graphs" if r.get("unique_graphs") is not None else "")
                + (f"; max loss difference from eager {r['max_loss_diff']:.2g}" if "max_loss_diff" in r else "")
            )
            lines.append(f"| {mode.replace('_', ' ')} step, static shapes ({g['distinct_shapes']} shapes) | {cell} |")
    if "parity" in report:
        p = report["parity"]
        lines.append(
            f"| {p.get('mode', 'bf16')} vs fp32 loss, max relative gap over {len(p['fp32_losses'])} steps | "
            f"{p['max_relative_gap']:.4f} |"
        )
    for r in report.get("loader", []):
        lines.append(f"| loader, {r['workers']} workers | {r['samples_per_sec']:.1f} samples/s |")
    if "allreduce" in report:
        a = report["allreduce"]
        lines.append(
            f"| gradient all-reduce on {a['backend']}: manual / DDP step | {a['manual_step_sec'] * 1e3:.1f} / "
            f"{a['ddp_step_sec'] * 1e3:.1f} ms ({a['manual_over_ddp']:.2f}x) |"
        )
    if "baseline" in report:
        lines += baseline_markdown(report)
    return "\n".join(lines) + "\n"


def _compile_cell(c: dict | None) -> str:
    if c is None:
        return "not run"
    if "speedup" not in c:
        return f"failed: {c['error']}"
    return (
        f"{c['eager_step_sec'] * 1e3:.1f} / {c['compiled_step_sec'] * 1e3:.1f} ms ({c['speedup']:.2f}x), "
        f"{c['unique_graphs']} graphs"
    )


def baseline_markdown(report: dict) -> list[str]:
    """The side-by-side table of --baseline: old code's rows against this tree's."""
    old = report["baseline"]
    lines = [
        "",
        "## Old code against new",
        "",
        f"Old: `{old['dir']}` (commit {old['commit'] or 'unknown'}); new: this tree (commit "
        f"{report.get('commit') or 'unknown'}). Same batches, same device, one after the other; both MFUs count "
        "this tree's FLOPs of the same batches.",
    ]
    notes = old["notes"] + ([old["error"]] if "error" in old else [])
    lines += [""] + [f"- {note}" for note in notes] if notes else []
    lines += [
        "",
        "| size | variant | batches | old samples/s | new samples/s | new / old | old MFU | new MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fresh = {(r["size"], r["variant"], r["batches"]): r for r in report.get("steps", [])}
    for r in old["steps"]:
        new = fresh.get((r["size"], r["variant"], r["batches"]), {})
        cells = [
            f"{r['samples_per_sec']:.1f}" if "samples_per_sec" in r else r.get("error", "n/a"),
            f"{new['samples_per_sec']:.1f}" if "samples_per_sec" in new else new.get("error", "n/a"),
            f"{r['new_over_old']:.2f}x" if "new_over_old" in r else "n/a",
            _pct(r.get("mfu")).strip(),
            _pct(new.get("mfu")).strip(),
        ]
        lines.append(f"| {r['size']} | {r['variant']} | {r['batches']} | " + " | ".join(cells) + " |")
    if old["compile"]:
        lines += ["", "| torch.compile (step, eager / compiled) | old | new |", "|---|---|---|"]
        fresh_compile = {c["batches"]: c for c in report.get("compile", [])}
        for c in old["compile"]:
            cells = [_compile_cell(c), _compile_cell(fresh_compile.get(c["batches"]))]
            lines.append(f"| {c['batches']} batches | " + " | ".join(cells) + " |")
    return lines


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


PARTS = ("steps", "compile", "cudagraphs", "parity", "loader", "allreduce")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [WORKER_FLAG]:
        return baseline_worker(Path(argv[1]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reduced", action="store_true", help="tiny shapes on the CPU (what CI runs)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--sizes", help="comma-separated subset of 135m,360m,1.7b")
    parser.add_argument("--steps", type=int, help="timed steps per measurement")
    parser.add_argument(
        "--dense", action="store_true", help="also time all-ones batches (every frame and token real), for comparison"
    )
    parser.add_argument("--no-record", action="store_true", help="do not update benchmarks/mfu_measured.json")
    parser.add_argument(
        "--precision",
        choices=("bf16", "bf16-autocast"),
        default="bf16",
        help="bf16 mode on a GPU (train.precision's names; default bf16: bf16 weights with fp32 masters, "
        "what the trainer runs); a CPU runs fp32",
    )
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)} (default: all)"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="another checkout (a folder holding fvlm/): time the steps (and compile) with its code too, "
        "side by side (see benchmarks/prepare_baseline.sh)",
    )
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    if set(parts) - set(PARTS):
        parser.error(f"--parts: unknown {sorted(set(parts) - set(PARTS))}; choose from {','.join(PARTS)}")
    if args.baseline is not None:
        if not (args.baseline / "fvlm" / "__init__.py").is_file():
            parser.error(f"--baseline {args.baseline}: no fvlm/__init__.py there (see benchmarks/prepare_baseline.sh)")
        if not {"steps", "compile"} & set(parts):
            parser.error("--baseline times the steps and compile parts: --parts has neither")
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
    from fvlm.training.throughput import peak_flops

    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    bf16 = cuda and torch.cuda.is_bf16_supported()
    precision = args.precision if bf16 else "fp32"
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
        "commit": code_version(HERE.parent),
        "date": time.strftime("%Y-%m-%d"),
        "precision": precision,
        "peak_flops": peak,
        "peak_source": source,
        "plan": {k: v for k, v in plan.items() if k != "configs"} | {"configs": plan["configs"]},
        "batches": list(kinds),
        "parts": parts,
    }
    # The JSON is rewritten after each part, so that a check cut short by a machine's time limit still
    # leaves what it measured.
    checks = {
        "steps": lambda: check_steps(plan, device, precision, peak, log, kinds),
        "compile": lambda: [check_compile(plan, device, precision, log, kind) for kind in kinds],
        "cudagraphs": lambda: check_cuda_graphs(plan, device, precision, log),
        "baseline": lambda: check_baseline(plan, device, precision, peak, log, kinds, parts, args.baseline, report),
        "parity": lambda: check_parity(plan, device, precision, log),
        "loader": lambda: check_loader(plan, log),
        "allreduce": lambda: check_allreduce(plan, log),
    }
    for part, check in checks.items():
        if part not in parts and not (part == "baseline" and args.baseline is not None):
            continue
        report[part] = check()
        report["seconds"] = time.perf_counter() - began
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))
    if cuda and not args.no_record and "steps" in parts:
        record_mfu(report, HERE / "mfu_measured.json")
    log(f"wrote {out / 'gpu_check.json'} and gpu_check.md in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
