"""fvlm: a framework for researching foveated video-language models."""

__version__ = "0.1.0"
