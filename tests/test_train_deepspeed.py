"""4.pretrain.py under the real DeepSpeed launcher on CPU with 2 ranks (gloo): ZeRO-2 and ZeRO-3 agree, loss falls,
a ZeRO checkpoint resumes exactly, and ZeRO-3 gathers the full weights for the Hugging Face save."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from train_fixtures import REPO, losses, require_data, single_thread_env, tiny_flags

pytestmark = pytest.mark.slow
STEPS = 8


def launch(out_dir: Path, zero_stage: int, *extra: str) -> None:
    deepspeed = Path(sys.executable).with_name("deepspeed")
    command = [str(deepspeed), "--num_gpus", "2", "--master_port", str(29500 + zero_stage), str(REPO / "4.pretrain.py"),
               *tiny_flags(out_dir, max_steps=STEPS, save_interval_steps=4, eval_interval=4, use_moe=True),
               "--zero_stage", str(zero_stage), *extra]
    result = subprocess.run(command, cwd=REPO, env=single_thread_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory) -> dict[int, Path]:
    require_data()
    if shutil.which("deepspeed", path=str(Path(sys.executable).parent)) is None:
        pytest.fail("the deepspeed launcher is not installed in this environment")
    root = tmp_path_factory.mktemp("zero")
    runs = {stage: root / f"zero{stage}" for stage in (2, 3)}
    for stage, out_dir in runs.items():
        launch(out_dir, stage)
    return runs


def test_zero2_and_zero3_fp32_losses_match_and_decrease(zero_runs):
    zero2, zero3 = losses(zero_runs[2]), losses(zero_runs[3])
    assert sorted(zero2) == sorted(zero3) == list(range(1, STEPS + 1))
    for step in zero2:
        assert zero2[step] == pytest.approx(zero3[step], abs=1e-5), step
    assert zero2[STEPS] < zero2[1] - 0.2


def test_zero3_final_model_is_gathered(zero_runs):
    from transformers import AutoModelForCausalLM

    import model as _registers_mateconv  # noqa: F401
    model = AutoModelForCausalLM.from_pretrained(zero_runs[3] / "final")
    assert model.config.use_moe and model.model.layers[0].mlp.experts[0].up_proj.weight.shape == (192, 64)
    twin = AutoModelForCausalLM.from_pretrained(zero_runs[2] / "final")
    for name, param in model.state_dict().items():
        assert param.allclose(twin.state_dict()[name], atol=1e-4), name


def test_zero2_checkpoint_resumes_exactly(zero_runs, tmp_path):
    checkpoint = zero_runs[2] / "checkpoints" / "step_00000004"
    assert (checkpoint / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()  # sharded optimizer state
    launch(tmp_path, 2, "--resume", str(checkpoint))
    resumed, full = losses(tmp_path), losses(zero_runs[2])
    assert sorted(resumed) == list(range(5, STEPS + 1))
    for step, loss in resumed.items():
        assert loss == pytest.approx(full[step], abs=1e-5), step
