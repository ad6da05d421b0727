"""Memory planning (engine/memory_plan.py): the KV pool gets what the measured needs leave of
gpu_memory_utilization x total, and the profile step the measurement runs works on any model."""
from __future__ import annotations

import pytest
import torch

from tandem.engine.config import EngineConfig
from tandem.engine.memory_plan import GIB, plan_kv_pool
from tandem.engine.model_runner import ModelRunner, load_hf_config


def test_the_pool_gets_the_rest_of_the_budget():
    plan = plan_kv_pool(total_bytes=80 * GIB, free_bytes=63 * GIB, gpu_memory_utilization=0.9,
                        weights_bytes=15 * GIB, activation_peak_bytes=3 * GIB, graph_reserve_bytes=1 * GIB,
                        bytes_per_block=2 * 1024**2)
    # 72 GiB of budget - 17 in use - 3 - 1 = 51 GiB of 2 MiB blocks.
    assert plan.in_use_bytes == 17 * GIB and plan.budget_bytes == 72 * GIB
    assert plan.num_blocks == 51 * 512 and plan.kv_bytes == 51 * GIB
    text = plan.describe()
    assert "KV pool: 26112 blocks" in text and "51.00 GiB" in text and "CUDA context" in text
    assert plan.as_dict()["kv_bytes"] == plan.kv_bytes


def test_no_room_for_a_block_is_a_clear_error():
    with pytest.raises(RuntimeError, match="not enough device memory.*gpu_memory_utilization"):
        plan_kv_pool(80 * GIB, 10 * GIB, 0.9, 60 * GIB, 2 * GIB, 1 * GIB, 2 * 1024**2)


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
@pytest.mark.parametrize("num_tokens", [1, 7, 64, 200])
def test_profile_step_runs_on_any_shape(model_dirs, arch, num_tokens):
    """Prefill-shaped (more tokens than sequences) and decode-shaped (one token each) profile steps,
    with the sampler's workspace, on a dense and a MoE model, beyond max_model_len per sequence."""
    config = EngineConfig(model=model_dirs[arch], num_kv_blocks=4, max_num_seqs=5, max_model_len=32)
    runner = ModelRunner(config, load_hf_config(config.model))
    before = runner.kv_cache.clone()
    runner._profile_step(num_tokens, sample=True)
    assert torch.equal(runner.kv_cache, before)  # the profile step writes no real block
    assert runner.memory_plan is None  # sized by num_kv_blocks: no plan


@pytest.mark.gpu
def test_gpu_pool_is_planned_from_measurements(llama_dir):
    from tandem import LLM

    llm = LLM(llama_dir, device="cuda", max_num_seqs=64, max_num_batched_tokens=512)
    plan = llm.engine.runner.memory_plan
    assert plan is not None and plan.num_blocks == llm.engine.block_manager.num_blocks
    assert plan.activation_peak_bytes > 0 and plan.graph_reserve_bytes > 0
    # Weights are materialised once, in bf16: nothing like a float32 copy's leftovers is in use.
    assert plan.weights_bytes <= plan.in_use_bytes < plan.weights_bytes + 2 * 1024**3
    free, total = torch.cuda.mem_get_info()
    assert total - free <= plan.budget_bytes + 256 * 1024**2  # graphs captured: still within the budget
