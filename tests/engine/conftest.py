"""Engine fixtures shared by the engine tests."""
import pytest


@pytest.fixture(scope="module")
def make_engine(llama_dir):
    """`make(connector, **config overrides)`: a small fp32 CPU engine with that KV connector."""
    from tandem.engine.config import EngineConfig
    from tandem.engine.llm_engine import LLMEngine

    def make(connector, **overrides):
        config = EngineConfig(model=llama_dir, device="cpu", dtype="float32", num_kv_blocks=128,
                              max_num_batched_tokens=48, **overrides)
        return LLMEngine(config, kv_connector=connector)

    return make
