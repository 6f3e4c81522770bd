import os

import pytest

# AReaL torch.compiles its logprob gather, and vLLM parts of its sampler: tens of seconds on one CPU
# core at the first call of every process (the test session, each spawned rank, each worker and
# server of a real run inherit this), for no gain at the tests' sizes. Tests compare the plugin with
# AReaL on the same eager path.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def pytest_collection_modifyitems(config, items):
    """The real-loop tests (``pipeline``, all in tests/test_pipeline.py) first. Under ``make test``
    (pytest-xdist, two workers, one test file per work unit) that file runs on one worker, its runs
    one after another, and starts early (measured: within 1.5 minutes) while the other worker takes
    every other file."""
    items.sort(key=lambda item: item.get_closest_marker("pipeline") is None)  # stable


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The harness's ``toy`` Qwen2 (4 layers, random weights, character tokenizer), written once per session."""
    from benchmarks.harness.models import build_model

    return build_model(tmp_path_factory.mktemp("toy-qwen2"), "toy", seed=0)
