"""Data: WebDataset shards of video, image and text-only samples; the synthetic dataset; mixing."""
