import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# SciPy's optimisers run several times slower with multithreaded BLAS on a small, busy machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
