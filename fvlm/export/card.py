"""The model card (`README.md`) of an exported folder: architecture, the run's training, its `fvlm eval`
result, use, limits and the backbones' licences."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fvlm.config import RunConfig
from fvlm.model.backbones import is_shape_name
from fvlm.model.vlm import FoveatedVLM, MultiTokenVLM

APACHE = "Apache-2.0"
OWN = "the fvlm project's own (same terms as the fvlm repository)"


def backbone_origin(spec: str, kind: str) -> tuple[str, str]:
    """(where a backbone's weights came from, their licence) for a `model.llm` / `model.dino` spec."""
    low = spec.lower()
    name = Path(spec).name or spec
    if is_shape_name(spec, kind):
        return f"the `{spec}` architecture, randomly initialised and trained only by this run", OWN
    if "tiny-backbones-" in low or name.startswith(("tiny-llm", "tiny-dino")):
        return f"fvlm's tiny pretrained backbone `{name}` (trained by the project on its synthetic world)", OWN
    if "smollm2" in low:
        return f"SmolLM2 (`{name}`, Hugging Face)", APACHE
    if "dinov2" in low:
        return f"DINOv2 (`{name}`, Meta AI)", APACHE
    return f"`{name}`", "the licence of that backbone (not known to fvlm)"


def _num(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _count(value: Any) -> str:
    """A count with thousands separators (n/a when unknown)."""
    return f"{int(value):,}" if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


def _flops(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


def _interval(pair: Any, digits: int = 4) -> str:
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
        return "n/a"
    return f"[{_num(pair[0], digits)}, {_num(pair[1], digits)}]"


def _front_matter(licences: list[str]) -> list[str]:
    licence = "apache-2.0" if all(x == APACHE for x in licences) else "other"
    return [
        "---",
        "library_name: transformers",
        f"license: {licence}",
        "pipeline_tag: video-text-to-text",
        "tags:",
        "- fvlm",
        "- foveated",
        "- video-text-to-text",
        "- custom_code",
        "---",
        "",
    ]


def _architecture(model: FoveatedVLM | MultiTokenVLM, cfg: RunConfig, origins: dict[str, tuple[str, str]]) -> list[str]:
    mc = model.cfg
    llm, dino = model.llm.config, model.encoder.dino.config
    if mc.arch == "multi_token":
        connector = (
            f"the multi-token baseline: DINO's patch grid average-pooled to {model.k}x{model.k} tokens per frame, "
            "projected into the LLM (`dino_to_llm`), no query"
        )
    else:
        read = (
            "passes through every DINO layer as one extra token (that layer's query projection, attention over the "
            "layer's keys and values of the frame's CLS and patch tokens, output projection, layer scale, residual, "
            "MLP; final layer norm)"
            if mc.deep_query
            else "reads DINO's final features with one cross-attention (the shallow-query ablation)"
        )
        connector = (
            f"one learned query per frame {read}; the resulting token is projected into the LLM (`dino_to_llm`), "
            f"so each frame costs the LLM one token"
        )
        if not mc.coarse_only:
            connector += (
                ". The LLM chooses the queries: its hidden state after frame t-1 becomes the query for frame t "
                "(`llm_to_query`; frame 0 uses `q_init`)"
            )
    lines = [
        "## Architecture",
        "",
        f"- Vision encoder: DINOv2 ({dino.num_hidden_layers} layers, width {dino.hidden_size}, "
        f"{dino.num_attention_heads} heads, patch {dino.patch_size}), {origins['dino'][0]}.",
        f"- Language model: {llm.model_type} ({llm.num_hidden_layers} layers, width {llm.hidden_size}, "
        f"vocabulary {llm.vocab_size}), {origins['llm'][0]}.",
        f"- Connector: {connector}. Visual tokens are scaled by {mc.visual_scale:g}.",
        f"- Frames: {mc.image_size}x{mc.image_size} px; videos sampled at {cfg.data.fps:g} frame/s, at most "
        f"{cfg.data.max_frames} frames; an image is {cfg.data.replicate_image_frames} frame(s).",
        f"- Inference modes: {', '.join(f'`{m}`' for m in model.supported_modes)} (default `{model.default_mode}`).",
    ]
    if mc.arch == "foveated" and not mc.coarse_only:
        lines += [
            "  `coarse_only` reads every frame with the static query `q_static`; `coarse_fine` reads them so, runs "
            "the LLM over those coarse tokens, and reads every frame again with the query the LLM chose (the fine "
            "tokens the LLM then answers from); `autoregressive` reads frame by frame, each query from the LLM's "
            "state after the previous fine token, as on a stream.",
        ]
    return lines + [""]


def _training(cfg: RunConfig, summary: dict | None, report: dict) -> list[str]:
    mix = ", ".join(f"{k} {v:g}" for k, v in cfg.data.mix.items()) if cfg.data.mix else "natural (no mix weights)"
    rows = [
        ("stage", f"{cfg.train.stage} (" + ("every text token" if cfg.train.stage == 1 else "answer tokens") + ")"),
        ("training data", f"`{cfg.data.train}`"),
        ("data mix", mix),
        ("text-only retention", f"{cfg.data.text_ratio:g}"),
        ("exported checkpoint", f"step {report['step']}" if report.get("step") is not None else "a saved model"),
    ]
    summary = summary or {}
    if summary:
        params = summary.get("params") or {}
        rows += [
            ("status", str(summary.get("status"))),
            ("samples seen", _count(summary.get("total_samples"))),
            ("optimizer steps", _count(summary.get("total_steps"))),
            ("best validation loss", f"{_num(summary.get('best_val_loss'))} (step {summary.get('best_val_step')})"),
            ("final training loss", _num(summary.get("final_train_loss"))),
            ("training FLOPs", _flops(summary.get("total_flops"))),
            ("wall time", f"{_num(summary.get('wall_time_hours'), 3)} h"),
            ("parameters", _count(params.get("total"))),
            ("git commit", f"`{summary.get('git_commit')}`"),
            ("config hash", f"`{summary.get('config_hash')}`"),
        ]
    lines = ["## Training", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    if not summary:
        lines += ["", "The run folder holds no `run_summary.json`: sample counts and losses are unknown."]
    return lines + [""]


def _evaluation(evaluation: dict | None, report: dict) -> list[str]:
    lines = ["## Evaluation", ""]
    if not evaluation:
        return lines + [
            "No `fvlm eval` result in the run folder (run `fvlm eval RUN` before exporting to add one).",
            "",
        ]
    lines.append(
        f"From `fvlm eval` (`eval/eval.json`) at step {evaluation.get('step')}, {evaluation.get('samples_seen')} "
        "samples seen."
    )
    if evaluation.get("step") != report.get("step"):
        lines.append(f"Note: the exported checkpoint is step {report.get('step')}, not the evaluated one.")
    modes = evaluation.get("modes") or {}
    if modes:
        lines += [
            "",
            "Validation loss of the answer tokens per inference mode, on the same samples (blank frames: the same "
            "samples with flat grey frames; pixel gain = blank - real):",
            "",
            "| mode | val loss | blank frames | pixel gain | samples | tokens |",
            "|---|---|---|---|---|---|",
        ]
        for mode, r in modes.items():
            lines.append(
                f"| {mode} | {_num(r.get('loss'))} | {_num(r.get('loss_blank_frames'))} | {_num(r.get('pixel_gain'))} "
                f"| {r.get('n')} | {r.get('tokens')} |"
            )
        intervals = evaluation.get("gap_intervals") or {}
        gaps = evaluation.get("gaps") or {}
        if gaps:
            lines += ["", "Paired differences (95% bootstrap interval):", ""]
            for key, value in gaps.items():
                ci = (intervals.get(key) or {}).get("ci95_bootstrap")
                lines.append(f"- {key.replace('_minus_', ' − ')}: {_num(value)} {_interval(ci)}")
    for name, by_mode in (evaluation.get("bench") or {}).items():
        lines += [
            "",
            f"Multiple choice, `{name}`:",
            "",
            "| mode | accuracy | 95% interval | chance | questions | grey frames |",
            "|---|---|---|---|---|---|",
        ]
        for mode, r in by_mode.items():
            grey = (r.get("grey_frames") or {}).get("accuracy")
            lines.append(
                f"| {mode} | {_num(r.get('accuracy'), 3)} | {_interval(r.get('ci95'), 3)} | {_num(r.get('chance'), 3)} "
                f"| {r.get('n')} | {_num(grey, 3)} |"
            )
    return lines + [""]


USAGE = """## Use

```python
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer

folder = "{folder}"  # this folder's path, or its Hub repository id
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)  # reads config.json: custom code
processor = AutoImageProcessor.from_pretrained(folder)

frames = [Image.open(f"frame_{{i}}.jpg") for i in range(4)]  # one video, in order
pixel_values = processor(images=frames, return_tensors="pt").pixel_values[None]  # [1, T, 3, S, S]
inputs = model.build_inputs(tokenizer, ["Describe what happens in this video."], pixel_values)
ids = model.generate(**inputs, mode="{mode}", max_new_tokens=32)
print(tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
```

`build_inputs` puts one frame slot per visual token before the chat-template prompt; the model replaces
the slots by its visual tokens. A batch of videos of different lengths takes `frame_mask` [B, T]
(real frames first). `model(**inputs, mode=...)` gives the logits over the whole sequence; with
`labels` (-100: no target) the mean cross-entropy, each target predicted from the nearest attended
position before it, as fvlm trains. Loading needs `trust_remote_code=True`: the modeling code is
`modeling_fvlm.py` in this folder (it imports torch and transformers only).
"""


def _limits(model: FoveatedVLM | MultiTokenVLM, origins: dict[str, tuple[str, str]]) -> list[str]:
    synthetic = any(x[1] == OWN for x in origins.values())
    lines = [
        "## Intended use",
        "",
        "Research on foveated video-language models: reading the model's answers, losses and attention in its "
        "inference modes, and comparing it with the other runs of an fvlm sweep. It is not a product model.",
        "",
        "## Limits",
        "",
        "- Trained by fvlm on the data named above only; it answers questions of that data's kind and nothing "
        "else reliably."
        + (" A model on fvlm's tiny or random backbones knows only fvlm's synthetic world." if synthetic else ""),
        "- No safety tuning or filtering beyond the backbones' own.",
        "- The image processor resizes with transformers' rounding of the longer side, which can differ from "
        "fvlm's by one pixel before the centre crop; the model's numbers above were measured on fvlm's frames.",
        "- The remote code supports the forward pass and greedy or sampled generation; training it further, "
        "beam search over the visual block, and static (compiled) caches are untested.",
        "",
    ]
    return lines


def _licences(origins: dict[str, tuple[str, str]]) -> list[str]:
    return [
        "## Licences",
        "",
        f"- Language model weights: {origins['llm'][1]} ({origins['llm'][0]}).",
        f"- Vision encoder weights: {origins['dino'][1]} ({origins['dino'][0]}).",
        "- The connector (queries, projections) was trained by this run: "
        + OWN
        + ". SmolLM2 and DINOv2 are both Apache-2.0.",
        "",
    ]


def model_card(
    model: FoveatedVLM | MultiTokenVLM,
    cfg: RunConfig,
    summary: dict | None,
    evaluation: dict | None,
    report: dict[str, Any],
    folder: str = "OUT",
) -> str:
    origins = {"llm": backbone_origin(model.cfg.llm, "llm"), "dino": backbone_origin(model.cfg.dino, "dino")}
    title = f"{report.get('run_id')}: fvlm {model.cfg.arch} video-language model"
    check = ", ".join(f"{m} {d:.2g}" for m, d in (report.get("max_logit_difference") or {}).items())
    lines = _front_matter([x[1] for x in origins.values()]) + [
        f"# {title}",
        "",
        f"Exported by `fvlm export` from `{report.get('checkpoint')}`. Loaded back before it was written, this "
        f"folder's logits equal fvlm's own (largest difference per mode: {check}).",
        "",
    ]
    lines += _architecture(model, cfg, origins)
    lines += _training(cfg, summary, report)
    lines += _evaluation(evaluation, report)
    lines += USAGE.format(folder=folder, mode=model.default_mode).splitlines() + [""]
    lines += _limits(model, origins)
    lines += _licences(origins)
    return "\n".join(lines)
