import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# SciPy's optimisers run several times slower with multithreaded BLAS on a small, busy machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import sys  # noqa: E402
import warnings  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from fvlm.model.pretrain_tiny import LLM_SHAPES, Recipe  # noqa: E402

# Tiny backbones from a few steps of everything: the plumbing and the determinism, not the quality.
QUICK_RECIPE = Recipe(
    dino_steps=3,
    dino_batch=4,
    dino_bank=16,
    probe_frames=16,
    dialogues=64,
    llm_batch=4,
    llm_steps=tuple((shape, 2) for shape in LLM_SHAPES),
    image_size=32,
)
# A synthetic set and model inputs small enough for a test of the tiny preset's plumbing.
MICRO_DATA = {
    "data.synth_videos": 48,
    "data.synth_images": 16,
    "data.synth_texts": 16,
    "data.synth_val": 16,
    "data.synth_frames": 4,
    "data.synth_size": 32,
    "data.max_frames": 4,
    "model.image_size": 32,
    "train.batch_size": 4,
    "train.eval_batch_size": 8,
    "train.eval_samples": 8,
    "train.probe_videos": 2,
}

FVLM_CODE = str(Path(__file__).resolve().parent.parent / "fvlm") + os.sep
DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def fvlm_call_site(frame) -> str | None:
    """`path:line` of the innermost frame of the fvlm package on the stack, or None."""
    while frame is not None:
        if frame.f_code.co_filename.startswith(FVLM_CODE):
            return f"fvlm/{frame.f_code.co_filename[len(FVLM_CODE) :]}:{frame.f_lineno}"
        frame = frame.f_back
    return None


@contextmanager
def deprecations_from_fvlm(keep: bool = False):
    """Collects the deprecation warnings raised while fvlm code is on the stack, as
    "site: category: message" lines; every warning still goes on to whoever records it, except,
    with `keep`, the ones collected here (a test of this check keeps them from failing itself).

    The stack has to be read while the warning is being shown: a library's warning names the frame
    its `stacklevel` points at, and for a model's forward that is torch's Module.__call__, never the
    fvlm line that passed the deprecated argument, so a `filterwarnings` entry by module cannot see
    it. Python shows a warning through `warnings._showwarnmsg_impl` (what pytest's recording
    replaces with its list's append), which is wrapped here for the duration.
    """
    found: list[str] = []
    shown = warnings._showwarnmsg_impl

    def check_then_show(message: warnings.WarningMessage) -> None:
        if issubclass(message.category, DEPRECATIONS):
            site = fvlm_call_site(sys._getframe(1))
            if site is not None:
                found.append(f"{site}: {message.category.__name__}: {message.message}")
                if keep:
                    return
        shown(message)

    warnings._showwarnmsg_impl = check_then_show
    try:
        yield found
    finally:
        warnings._showwarnmsg_impl = shown


def _fail_on_deprecated_calls():
    """Runs one phase of a test (setup, with the module and session fixtures it builds; the call;
    teardown) and fails it when fvlm called something its library has deprecated during it. A
    deprecation inside a library that fvlm cannot avoid is ignored by name in pyproject's
    filterwarnings (filters apply before a warning is shown)."""
    with deprecations_from_fvlm() as found:
        result = yield
    if found:
        pytest.fail("deprecated calls from fvlm:\n" + "\n".join(dict.fromkeys(found)), pytrace=False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _fail_on_deprecated_calls())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _fail_on_deprecated_calls())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    return (yield from _fail_on_deprecated_calls())


def eager_and_compiled(model):
    """(model, a deep copy compiled as `train.compile` compiles it, the list of graphs dynamo hands
    the copy's backend). The backend only records each graph and runs it as it is: inductor would get
    the same graphs, and take minutes of C++ to build them."""
    import copy

    import torch._dynamo

    from fvlm.model.build import compile_model

    graphs = []

    def counting_backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    compiled = copy.deepcopy(model)
    torch._dynamo.reset()
    compile_model(compiled, backend=counting_backend)
    return model, compiled, graphs


def assert_same_grads_then_clear(model, other, atol=1e-6):
    """The two models' parameters got the same gradients (or none on both); clears them for the next
    step."""
    import torch

    for a, b in zip(model.parameters(), other.parameters()):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=atol)
            a.grad = b.grad = None
