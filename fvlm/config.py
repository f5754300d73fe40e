"""One typed, nested config tree for a run, loaded from YAML plus `key=value` overrides.

Every field is read by some part of fvlm; an unknown key is an error (the reference implementation
had keys that nothing read, so ablations silently trained the baseline). Validation names the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from fvlm.errors import LimitError, UsageError, parse_yaml, read_yaml, yaml_problem

CONFIG_DIR = Path(__file__).parent / "configs"
# Bounds of the synthetic set's frames (data.synth_size, data.synth_frames and `fvlm data synth`'s
# --size and --frames): past them a set no longer fits in memory while it is painted.
SYNTH_SIZES = (16, 1024)
SYNTH_MAX_FRAMES = 256


@dataclass
class ModelConfig:
    arch: Literal["foveated", "multi_token"] = "foveated"
    # A local Hugging Face folder, a hub id found in the local cache, or a shape name from
    # fvlm/model/shapes (tiny, smollm2-135m, ...). Shape names build random weights.
    llm: str = "tiny"
    dino: str = "tiny"
    deep_query: bool = True
    coarse_only: bool = False
    # Visual tokens per frame: 1 for the foveated model, a square k*k for the multi-token baseline
    # (null picks 1 or 16 by architecture).
    tokens_per_frame: int | None = None
    lambda_coarse: float = 0.0
    freeze_dino: bool = False
    freeze_llm: bool = False
    # Width of q_static / q_init / llm_to_query outputs; null means the DINO width.
    query_dim: int | None = None
    # How the queries start. "cls": as DINO's own CLS token, so that before any training the coarse
    # token is DINO's CLS output and every fine query too (llm_to_query starts at zero weight); a
    # pretrained DINO's CLS already attends to the objects. "random": Gaussian vectors. "cls" needs
    # query_dim equal to DINO's width.
    query_init: Literal["cls", "random"] = "cls"
    visual_scale: float = 0.14
    image_size: int = 224
    gradient_checkpointing: bool = False
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    # Targets per chunk of the text loss's lm_head + cross-entropy (fvlm.model.chunked_ce): at most
    # [ce_chunk, vocab] fp32 logits live at once instead of all targets'. 0 = one F.cross_entropy over all.
    # Compiled, each distinct ceil(targets / ce_chunk) is one more graph.
    ce_chunk: int = 0


@dataclass
class DataConfig:
    # Shards: a folder, a glob, a comma-separated list, a YAML mix file, or "synthetic"
    # (the project's own synthetic set, generated on first use under <out_dir>/data/).
    train: str = "synthetic"
    val: str = "synthetic"
    probe: str = "synthetic"
    # Per-source sampling weights, e.g. {video: 0.55, image: 0.30, text: 0.15}; empty = natural mix.
    mix: dict[str, float] = field(default_factory=dict)
    text_ratio: float = 0.14
    replicate_image_frames: int = 1
    max_frames: int = 8
    fps: float = 1.0
    max_text_tokens: int = 128
    # The system turn before every dialogue: "auto" = upstream fVLM's "You are a helpful AI assistant."
    # where the chat template would insert a default of its own (SmolLM2), none where it would not (the
    # tiny byte tokenizer); "" = none; any other text = that text. A sample's own `system` field wins.
    system_prompt: str = "auto"
    num_workers: int = 0
    # Dynamic batching: cap on the total number of frames in a batch (0 = off).
    max_batch_frames: int = 0
    seed: int | None = None
    # Synthetic data used when a path above is "synthetic".
    synth_videos: int = 2000
    synth_images: int = 500
    synth_texts: int = 500
    synth_frames: int = 8
    synth_size: int = 64
    synth_val: int = 200
    # Share of the synthetic train/val videos and images asked as multiple choice (the rest are captions).
    synth_mc_fraction: float = 0.0
    # The synthetic scenes: objects per video (images keep at most 4), object side as a share of the
    # frame side, and the background ("texture" or "flat"); see fvlm.data.synth.
    synth_min_objects: int = 3
    synth_max_objects: int = 5
    synth_object_scale: list[float] = field(default_factory=lambda: [0.125, 0.19])
    synth_background: Literal["texture", "flat"] = "texture"
    # What the synthetic videos ask (fvlm.data.synth): "motion" (which object moves and which way),
    # "reveal" (the colour a white object turns into while three others appear around it) or "marked"
    # (the colour of the moving object that sits on a white mark, among up to three others).
    synth_video_task: Literal["motion", "reveal", "marked"] = "motion"
    # What the synthetic images ask: "named" (the colour, shape or place of an object the question
    # names) or "marked" (the colour of the object on a white mark, among up to three others).
    synth_image_task: Literal["named", "marked"] = "named"
    # Preference pairs (fvlm.data.synth, for DPO): this many train pairs in <set>/pairs/ and a tenth as
    # many (at least 16) held out in <set>/pairs_val/; "chosen" is the answer the pixels support.
    synth_pairs: int = 0


@dataclass
class DPOConfig:
    """Direct preference optimisation (fvlm.training.dpo): every train sample must be a preference
    pair (docs/design.md §5); the reference model is train.init_from, frozen."""

    enabled: bool = False
    beta: float = 0.1
    # sigmoid: -log sigmoid(beta * margin) (Rafailov et al. 2023), with label_smoothing the
    # conservative variant; ipo: (margin - 1 / (2 beta))^2 (Azar et al. 2023).
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    label_smoothing: float = 0.0
    # Adds sft_weight x the chosen answer's mean per-token NLL to each pair's loss (the "DPO + SFT"
    # regulariser, RPO: Pang et al. 2024), so the chosen answers' log-probabilities do not fall.
    # 0 is plain DPO.
    sft_weight: float = 0.0


@dataclass
class TrainConfig:
    stage: int = 1
    max_steps: int = 0
    max_samples: int = 0
    batch_size: int = 8
    grad_accum: int = 1
    eval_every: int = 100
    save_every: int = 100
    log_every: int = 10
    keep_last: int = 2
    # Checkpoints at this many evenly spaced points of the run are kept for later evaluation (0 = none).
    keep_milestones: int = 5
    eval_batch_size: int = 8
    eval_samples: int = 256
    # Probe videos whose raw encoder attention is saved at every eval point (0 = none).
    probe_videos: int = 10
    grad_clip: float = 1.0
    # bf16: bf16 parameters (no per-op weight casts) with fp32 master weights in the optimizer;
    # bf16-autocast: fp32 parameters under torch.autocast; auto: bf16 on a CUDA device, else fp32.
    # Checkpoints hold fp32 weights in every mode (fvlm/training/precision.py).
    precision: Literal["auto", "fp32", "bf16", "bf16-autocast"] = "auto"
    # How gradients meet across processes (torchrun, --nproc): DistributedDataParallel, or FSDP2
    # (fully_shard: weights, gradients and optimizer state sharded over ranks, for the larger LLMs).
    # One process ignores it.
    distributed: Literal["ddp", "fsdp"] = "ddp"
    # torch.compile of the training step: one graph (fullgraph), sizes that vary between batches
    # marked dynamic. GPU only (on a CPU the compiles cost more than the faster steps save in runs
    # of a few thousand steps; the flag is ignored there: docs/findings.md, "Training speed").
    compile: bool = False
    # Pad every training batch to the shape ladder (fvlm/model/batch_index.py `bucket`: under a quarter more,
    # a few dozen shapes over a run instead of one per batch). Padding changes no loss or gradient.
    static_shapes: bool = False
    # With compile on a GPU: capture the compiled step in CUDA graphs (compile's "reduce-overhead"),
    # one per shape; needs train.compile and train.static_shapes.
    cuda_graphs: bool = False
    # Intra-op threads on CPU (0 = torch's default); small models on busy cores run faster with 1.
    cpu_threads: int = 0
    # Peak FLOP/s of one device, for MFU; default: the bf16 peak of a known GPU (A100, H100, H200)
    # when training in bf16, else MFU stays blank.
    peak_flops: float | None = None
    init_from: str = ""
    dpo: DPOConfig = field(default_factory=DPOConfig)
    # Stop as diverged when the running loss climbs above this multiple of its lowest level (and far
    # above the loss's step-to-step noise: fvlm/training/divergence.py).
    divergence_factor: float = 5.0
    wandb: Literal["off", "online", "offline"] = "off"
    wandb_project: str = "fvlm"


@dataclass
class OptimConfig:
    lr_connector: float = 1e-4
    lr_dino: float = 1e-5
    lr_llm: float = 1e-5
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    schedule: Literal["cosine", "constant", "converging"] = "cosine"
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.1

    def peak_lrs(self) -> dict[str, float]:
        """Each parameter group's peak learning rate, by group name."""
        return {"connector": self.lr_connector, "dino": self.lr_dino, "llm": self.lr_llm}


@dataclass
class RunConfig:
    run_id: str = "run"
    out_dir: str = "runs"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def config_hash(self) -> str:
        """Identifies a run's settings: everything except where it is written and what it is called."""
        settings = self.to_dict()
        settings.pop("run_id")
        settings.pop("out_dir")
        blob = json.dumps(settings, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    @property
    def data_seed(self) -> int:
        """The seed of the data stream and the synthetic set: data.seed, else the run's seed."""
        return self.data.seed if self.data.seed is not None else self.seed

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.run_id


# ----------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Checks (and gently converts) a YAML value against a field's type annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except UsageError as exc:
                errors.append(str(exc))
        raise UsageError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise UsageError(f"{where}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise UsageError(f"{where}: expected a mapping, got {value!r}")
        _, value_type = typing.get_args(tp)
        return {str(k): _coerce(v, value_type, f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise UsageError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UsageError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, float) and not math.isfinite(value):
            # int() of an infinity raises OverflowError, of NaN ValueError: neither is an integer.
            raise UsageError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise UsageError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string; it is the way people write learning rates.
            try:
                if abs(float(value)) != float("inf") and float(value) == float(value):
                    return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise UsageError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise UsageError(f"{where}: unsupported type {_type_name(tp)}")


def _apply(obj: Any, updates: dict[str, Any], prefix: str, source: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in updates.items():
        where = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(prefix + c for c in close)}?)" if close else ""
            raise UsageError(f"{source}: unknown config key '{where}'{hint}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UsageError(f"{source}: '{where}' is a section; expected a mapping, got {value!r}")
            _apply(current, value, f"{where}.", source)
        else:
            setattr(obj, key, _coerce(value, hints[key], f"{source}: {where}"))


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """`a.b=value` strings to (key, YAML-parsed value) pairs."""
    pairs = []
    for item in items:
        if "=" not in item:
            raise UsageError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = parse_yaml(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        except LimitError as exc:
            raise UsageError(f"override '{key.strip()}': {yaml_problem(exc)}") from None
        pairs.append((key.strip(), value))
    return pairs


def resolve_config_path(name_or_path: str | None) -> Path:
    """A config file path, or the name of a shipped config (tiny, paper_135m_stage1, ...)."""
    if name_or_path is None:
        return CONFIG_DIR / "tiny.yaml"
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UsageError(f"config file not found: {path}")
        return path
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise UsageError(f"no config file or shipped config named '{name_or_path}' (shipped: {', '.join(names)})")


def load_config(name_or_path: str | None = None, overrides: list[str] | dict[str, Any] | None = None) -> RunConfig:
    """Loads a config file (following `base:` chains) and applies overrides, then validates it."""
    cfg = RunConfig()
    path = resolve_config_path(name_or_path)
    for layer_path, data in _read_chain(path):
        _apply(cfg, data, "", str(layer_path))
    if isinstance(overrides, dict):
        override_pairs = list(overrides.items())
    else:
        override_pairs = parse_overrides(list(overrides or []))
    for key, value in override_pairs:
        _apply(cfg, _nest(key, value), "", "override")
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any], source: str = "config") -> RunConfig:
    cfg = RunConfig()
    _apply(cfg, data, "", source)
    validate(cfg)
    return cfg


def _read_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict[str, Any]]]:
    if path.resolve() in seen:
        raise UsageError(f"{path}: 'base:' chain loops back on itself")
    try:
        data = read_yaml(path) or {}
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping at the top level")
    chain: list[tuple[Path, dict[str, Any]]] = []
    base = data.pop("base", None)
    if base is not None:
        base_path = (path.parent / f"{base}.yaml") if not str(base).endswith((".yaml", ".yml")) else path.parent / base
        if not base_path.is_file():
            base_path = resolve_config_path(str(base))
        chain = _read_chain(base_path, seen + (path.resolve(),))
    return chain + [(path, data)]


def _lookup(cfg: RunConfig, where: str) -> Any:
    value: Any = cfg
    for part in where.replace("[", ".[").split("."):
        if part.startswith("["):
            value = value[int(part[1:-1])]
        elif isinstance(value, dict):
            value = value[part]
        else:
            value = getattr(value, part)
    return value


def _positive(value: float, where: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise UsageError(f"{where} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _non_finite(value: Any, where: str) -> str | None:
    """The first field holding NaN or an infinity, searched through dataclasses, dicts and lists."""
    if isinstance(value, float):
        return None if math.isfinite(value) else where
    if dataclasses.is_dataclass(value):
        items = ((f.name, getattr(value, f.name)) for f in dataclasses.fields(value))
    elif isinstance(value, dict):
        items = ((str(k), v) for k, v in value.items())
    elif isinstance(value, list):
        items = ((f"[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for name, item in items:
        found = _non_finite(item, f"{where}.{name}" if where and not name.startswith("[") else f"{where}{name}")
        if found:
            return found
    return None


def validate(cfg: RunConfig) -> None:
    """Impossible values and combinations, each named by field."""
    bad = _non_finite(cfg, "")
    if bad:
        # NaN passes every comparison check below (NaN < 0 is False), so it is caught first.
        raise UsageError(f"{bad} must be a finite number, got {_lookup(cfg, bad)}")
    m, d, t, o = cfg.model, cfg.data, cfg.train, cfg.optim
    for name, seed in (("seed", cfg.seed), ("data.seed", d.seed)):
        # NumPy's and PyTorch's generators take seeds in [0, 2**32).
        if seed is not None and not 0 <= seed < 2**32:
            raise UsageError(f"{name} must be in [0, 2**32), got {seed}")
    if not cfg.run_id or any(c in cfg.run_id for c in "/\\\0") or cfg.run_id in (".", ".."):
        # A run id is one folder inside out_dir: ".." would write beside it, "." into it.
        raise UsageError(f"run_id must be a plain folder name (not '.', '..', no '/' or '\\'), got {cfg.run_id!r}")
    for name in ("out_dir", "model.llm", "model.dino", "data.train", "data.val", "data.probe", "train.wandb_project"):
        # An empty path would mean the current folder (out_dir=) or nothing at all; say so instead.
        if not str(_lookup(cfg, name)).strip():
            raise UsageError(f"{name} must not be empty")
    if m.tokens_per_frame is None:
        m.tokens_per_frame = 1 if m.arch == "foveated" else 16
    if m.arch == "foveated" and m.tokens_per_frame != 1:
        raise UsageError("model.tokens_per_frame must be 1 for model.arch=foveated (use arch=multi_token)")
    if m.arch == "multi_token":
        k = round(m.tokens_per_frame**0.5)
        if m.tokens_per_frame < 1 or k * k != m.tokens_per_frame:
            raise UsageError(f"model.tokens_per_frame must be a square (1, 4, 16, ...), got {m.tokens_per_frame}")
        if m.coarse_only or not m.deep_query:
            raise UsageError("model.coarse_only / model.deep_query apply to arch=foveated only")
    if m.coarse_only and m.lambda_coarse != 0:
        raise UsageError("model.lambda_coarse has no meaning with model.coarse_only=true (the coarse loss is the loss)")
    _positive(m.lambda_coarse, "model.lambda_coarse", allow_zero=True)
    _positive(m.visual_scale, "model.visual_scale")
    _positive(m.image_size, "model.image_size")
    _positive(m.ce_chunk, "model.ce_chunk", allow_zero=True)
    if m.query_dim is not None:
        _positive(m.query_dim, "model.query_dim")
    if m.query_init == "cls" and m.query_dim is not None:
        raise UsageError(
            "model.query_init=cls starts the queries as DINO's CLS token, so model.query_dim must "
            "be null (DINO's width); use model.query_init=random with a custom query_dim"
        )
    if not 0 <= d.text_ratio <= 1:
        raise UsageError(f"data.text_ratio must be in [0, 1], got {d.text_ratio}")
    for source, weight in d.mix.items():
        if weight < 0:
            raise UsageError(f"data.mix.{source} must be >= 0, got {weight}")
    if d.mix and sum(d.mix.values()) <= 0:
        raise UsageError("data.mix weights must not all be zero")
    _positive(d.replicate_image_frames, "data.replicate_image_frames")
    _positive(d.max_frames, "data.max_frames")
    _positive(d.fps, "data.fps")
    _positive(d.max_text_tokens, "data.max_text_tokens")
    _positive(d.num_workers, "data.num_workers", allow_zero=True)
    _positive(d.max_batch_frames, "data.max_batch_frames", allow_zero=True)
    for name in ("synth_videos", "synth_images", "synth_texts", "synth_val"):
        _positive(getattr(d, name), f"data.{name}", allow_zero=True)
    if not 1 <= d.synth_frames <= SYNTH_MAX_FRAMES:
        raise UsageError(f"data.synth_frames must be in [1, {SYNTH_MAX_FRAMES}], got {d.synth_frames}")
    if not SYNTH_SIZES[0] <= d.synth_size <= SYNTH_SIZES[1]:
        raise UsageError(f"data.synth_size must be in [{SYNTH_SIZES[0]}, {SYNTH_SIZES[1]}] pixels, got {d.synth_size}")
    if not 0 <= d.synth_mc_fraction <= 1:
        raise UsageError(f"data.synth_mc_fraction must be in [0, 1], got {d.synth_mc_fraction}")
    if not 1 <= d.synth_min_objects <= d.synth_max_objects:
        raise UsageError(
            f"data.synth_min_objects ({d.synth_min_objects}) must be >= 1 and <= "
            f"data.synth_max_objects ({d.synth_max_objects})"
        )
    scale = d.synth_object_scale
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] < 1:
        raise UsageError(f"data.synth_object_scale must be [min, max] with 0 < min <= max < 1, got {scale}")
    if t.stage not in (1, 2, 3):
        raise UsageError(f"train.stage must be 1, 2 or 3, got {t.stage}")
    if t.cuda_graphs and not (t.compile and t.static_shapes):
        raise UsageError(
            "train.cuda_graphs needs train.compile=true and train.static_shapes=true (a CUDA graph replays "
            "one shape; without the shape ladder every batch would capture a new one)"
        )
    _positive(d.synth_pairs, "data.synth_pairs", allow_zero=True)
    _positive(t.dpo.beta, "train.dpo.beta")
    if not 0 <= t.dpo.label_smoothing < 0.5:
        raise UsageError(f"train.dpo.label_smoothing must be in [0, 0.5), got {t.dpo.label_smoothing}")
    if not (math.isfinite(t.dpo.sft_weight) and t.dpo.sft_weight >= 0):
        raise UsageError(f"train.dpo.sft_weight must be a finite number >= 0, got {t.dpo.sft_weight}")
    if t.dpo.loss == "ipo" and t.dpo.label_smoothing:
        raise UsageError("train.dpo.label_smoothing applies to train.dpo.loss=sigmoid only")
    if t.dpo.enabled and not t.init_from:
        raise UsageError("train.dpo.enabled needs train.init_from (the frozen reference model, e.g. stage 2's result)")
    if t.dpo.enabled and t.stage == 1:
        raise UsageError("train.dpo.enabled needs train.stage 2 or 3 (answer tokens only)")
    for name in (
        "batch_size",
        "grad_accum",
        "eval_every",
        "save_every",
        "log_every",
        "keep_last",
        "eval_batch_size",
        "eval_samples",
    ):
        _positive(getattr(t, name), f"train.{name}")
    _positive(t.max_steps, "train.max_steps", allow_zero=True)
    _positive(t.probe_videos, "train.probe_videos", allow_zero=True)
    _positive(t.keep_milestones, "train.keep_milestones", allow_zero=True)
    _positive(t.cpu_threads, "train.cpu_threads", allow_zero=True)
    if t.peak_flops is not None:
        _positive(t.peak_flops, "train.peak_flops")
    _positive(t.max_samples, "train.max_samples", allow_zero=True)
    _positive(t.grad_clip, "train.grad_clip", allow_zero=True)
    _positive(t.divergence_factor, "train.divergence_factor")
    for name in ("lr_connector", "lr_dino", "lr_llm"):
        _positive(getattr(o, name), f"optim.{name}", allow_zero=True)
    if not 0 <= o.warmup_ratio < 1:
        raise UsageError(f"optim.warmup_ratio must be in [0, 1), got {o.warmup_ratio}")
    if not 0 <= o.min_lr_ratio <= 1:
        raise UsageError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
