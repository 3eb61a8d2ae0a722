"""init_weights (seed 003's `model.archive: policy.pt`): a file of weights loaded into the starting model, and into
DPO's reference when the reference is the starting model."""
from __future__ import annotations

import pytest
import torch

from mateconv.config import ConfigError, parse_config
from mateconv.train.stages import RECIPES, run
from conftest import read_metrics

pytestmark = pytest.mark.usefixtures("single_thread")


def archive_of(trained, tmp_path):
    """A randomly initialised model of `trained`'s shape (a save_pretrained directory) and `trained`'s weights as
    seed 003's trainer saves them: policy.pt = {"step_idx", "state", "metrics"}."""
    from transformers import AutoConfig

    from model import MateConvForCausalLM

    torch.manual_seed(1)
    untrained = tmp_path / "untrained"
    MateConvForCausalLM(AutoConfig.from_pretrained(trained)).save_pretrained(untrained)
    archive = tmp_path / "policy.pt"
    weights = MateConvForCausalLM.from_pretrained(trained).state_dict()
    torch.save({"step_idx": 150, "state": weights, "metrics": {}}, archive)
    return untrained, archive


def first_rows(tiny_flags, out, stage, **settings):
    """The metrics of a run's evaluation at step 0 and its first step (timings left out)."""
    run(RECIPES[stage], parse_config(tiny_flags(out, stage, **settings), RECIPES[stage].defaults))
    rows = read_metrics(out)
    return {f"{row['step']}/{key}": value for row in rows if row["step"] <= 1 for key, value in row.items()
            if key not in ("step", "time", "tokens_per_sec", "real_tokens_per_sec", "mfu", "memory/rss_gb")}


def test_pretrain_starts_from_the_archived_weights(tiny_pretrain_model, tiny_flags, tmp_path):
    untrained, archive = archive_of(tiny_pretrain_model, tmp_path)

    def start(name, **settings):
        return first_rows(tiny_flags, tmp_path / name, "pretrain", max_steps=1, eval_at_start=True, **settings)

    archived = start("archived", init_from=untrained, init_weights=archive)
    assert archived == pytest.approx(start("trained", init_from=tiny_pretrain_model))
    assert archived["0/val_loss"] < start("untrained", init_from=untrained)["0/val_loss"] - 0.1


def test_dpo_reference_takes_the_archived_weights_too(tiny_sft_model, tiny_flags, tmp_path):
    """Policy and reference both start from the archive: DPO's first evaluation and step match a run from the trained
    directory, with the reference on the fly and precomputed."""
    untrained, archive = archive_of(tiny_sft_model, tmp_path)
    for precompute in (False, True):
        def start(name, **settings):
            return first_rows(tiny_flags, tmp_path / f"{name}-{precompute}", "dpo", max_steps=1,
                              precompute_ref=precompute, **settings)

        archived = start("archived", init_from=untrained, init_weights=archive)
        assert archived == pytest.approx(start("trained", init_from=tiny_sft_model), rel=1e-5, abs=1e-6)
        assert archived["0/val_loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference: -log sigmoid(0)


def test_bad_archives_are_one_line(tiny_pretrain_model, tiny_flags, tmp_path):
    torch.save({"state": {"model.embed_tokens.weight": torch.zeros(3, 3)}}, tmp_path / "wrong_shape.pt")
    torch.save({"step_idx": 3}, tmp_path / "no_weights.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a pickle")
    for name, message in [("missing.pt", "does not exist"), ("wrong_shape.pt", "does not fit the model"),
                          ("no_weights.pt", "holds no state dict"), ("garbage.pt", "cannot read")]:
        config = parse_config(tiny_flags(tmp_path / "run", init_from=tiny_pretrain_model,
                                         init_weights=tmp_path / name))
        with pytest.raises(ConfigError, match=f"init_weights: .*({name}.* {message}|{message} .*{name})") as error:
            run(RECIPES["pretrain"], config)
        assert "\n" not in str(error.value)


def test_an_archive_directory_is_the_model_to_start_from():
    config = parse_config(["--init_from", "base/model", "--init_weights", "out/sft/final"])
    assert (config.checkpoint.init_from, config.checkpoint.init_weights) == ("out/sft/final", "")
    config = parse_config(["--init_from", "base/model", "--init_weights", "runs/LATEST/policy.pt"])
    assert (config.checkpoint.init_from, config.checkpoint.init_weights) == ("base/model", "runs/LATEST/policy.pt")
