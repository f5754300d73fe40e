"""The foveated VLM, its baselines, backbones and FLOP counter."""
