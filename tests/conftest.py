import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A random 4-layer Qwen2 and word-level tokenizer, written once per test session."""
    from areal_a3po.toy import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), seed=0)
