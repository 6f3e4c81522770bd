import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The harness's ``toy`` Qwen2 (4 layers, random weights, character tokenizer), written once per session."""
    from benchmarks.harness.models import build_model

    return build_model(tmp_path_factory.mktemp("toy-qwen2"), "toy", seed=0)
