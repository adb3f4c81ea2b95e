"""The CUDA path (run where a GPU is at hand; skipped elsewhere): a tiny OLMoE-config federated run of 2
rounds on the GPU in bf16 trains, keeps every tensor of the round where it belongs, and ends near the CPU
float32 run's loss."""

import math

import pytest
import torch

from tiny_checkpoints import PROMPT_WORDS, WORDS, write_tiny_moe
from tiny_experiment import assert_every_client_answered, causal_overrides
from ubsmoe.config import load_config
from ubsmoe.engine.experiment import build_experiment
from ubsmoe.engine.rounds import run_experiment

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]


@pytest.mark.parametrize("method", ["ubsmoe", "smoe-bias", "a3smoe", "default-moe", "hetlora", "flora"])
def test_a_tiny_olmoe_trains_on_the_gpu_in_bf16(tmp_path, tiny_suite, method):
    folder = write_tiny_moe(tmp_path / "olmoe", "olmoe", words=tuple(WORDS) + tuple(PROMPT_WORDS))
    overrides = causal_overrides(folder, tiny_suite, **{"federation.rounds": 2})
    gpu = load_config(overrides=overrides + ["device=cuda", "precision=bf16"], method=method)
    exp = build_experiment(gpu)
    assert {p.device.type for p in exp.model.parameters()} == {"cuda"}
    assert all(t.device.type == "cpu" for t in exp.model.trainable_state().values())

    on_gpu = run_experiment(gpu, show_progress=False)
    on_cpu = run_experiment(load_config(overrides=overrides, method=method), show_progress=False)

    assert all(math.isfinite(c.train_loss) for c in on_gpu.history[-1].clients)
    assert_every_client_answered(on_gpu)
    assert on_gpu.final.test_loss == pytest.approx(on_cpu.final.test_loss, rel=0.05)
