import os

import pytest

# AReaL torch.compiles its logprob gather, and vLLM parts of its sampler: tens of seconds on one CPU
# core at the first call of every process (the test session, each spawned rank, each worker and
# server of a real run inherit this), for no gain at the tests' sizes. Tests compare the plugin with
# AReaL on the same eager path.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The harness's ``toy`` Qwen2 (4 layers, random weights, character tokenizer), written once per session."""
    from benchmarks.harness.models import build_model

    return build_model(tmp_path_factory.mktemp("toy-qwen2"), "toy", seed=0)
