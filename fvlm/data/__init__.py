"""Data: WebDataset shards of video, image and text-only samples; the synthetic dataset; mixing.

- `sources`: a path spec (folder, glob, comma list, YAML mix file) -> sources of shards.
- `index`: one scan of the tar headers -> every sample's byte range, source, kind, frame count.
- `schedule`: the seeded training stream (mix weights, text-only share, per-source epochs).
- `decode`: frames (JPEG sequence, image, .mp4) and chat-template tokens with a loss mask.
- `loader`: `build_loader(cfg, split, tokenizer, ...)`, batches, the resumable cursor.
- `synth`: `generate_synthetic(...)`, `ensure_synthetic(cfg)`.
- `inspect`, `cli`: `fvlm data synth` and `fvlm data inspect`.
"""
