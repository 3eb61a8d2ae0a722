"""9.train_dpo.py: bad input gives a one-line error naming the problem."""
from __future__ import annotations

import pytest

from mateconv.train.dpo import main


@pytest.mark.parametrize("argv,message", [
    (["--init_from", "/nonexistent/sft"], "reference model /nonexistent/sft is not a directory"),
    (["--dpo_loss_type", "kto"], "loss_type must be one of sigmoid, ipo, hinge"),
    (["--kl_coeff", "0.05"], "unknown config key 'kl_coeff'; did you mean 'dpo_kl_coef'?"),
])
def test_bad_input_is_one_line(argv, message):
    with pytest.raises(SystemExit) as error:
        main(argv + ["--tracker", "none", "--engine", "torch", "--device", "cpu"])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_missing_shards_are_named(tiny_llama, tmp_path):
    tiny_llama(0).save_pretrained(tmp_path / "sft")
    with pytest.raises(SystemExit, match="DPO token shards not found: .*missing"):
        main(["--init_from", str(tmp_path / "sft"), "--data_path", str(tmp_path / "missing"), "--tracker", "none",
              "--engine", "torch", "--device", "cpu", "--out_dir", str(tmp_path / "out")])
