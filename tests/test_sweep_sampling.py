"""Optuna mapping of W&B distributions: log scales sample values spread over orders of magnitude."""
import math

import numpy as np
import optuna
import pytest

from mateconv.sweep.config import SweepError, parse_param
from mateconv.sweep.optuna_backend import suggest


def _sample(spec: dict, n: int = 300) -> np.ndarray:
    param = parse_param("x", spec)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    values = []
    for _ in range(n):
        trial = study.ask()
        values.append(suggest(trial, param))
        study.tell(trial, 0.0)
    return np.array(values, dtype=float)


@pytest.mark.parametrize("spec", [
    {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-2},
    # W&B's log_uniform takes natural-log exponents: the same value range as above.
    {"distribution": "log_uniform", "min": math.log(1e-5), "max": math.log(1e-2)},
])
def test_log_scales_sample_values_across_orders_of_magnitude(spec):
    values = _sample(spec)
    assert values.min() >= 1e-5 * (1 - 1e-9) and values.max() <= 1e-2 * (1 + 1e-9)
    decades = np.floor(np.log10(values)).astype(int)
    counts = {d: int((decades == d).sum()) for d in (-5, -4, -3)}
    # log-uniform: about a third in each decade (uniform sampling would put ~90% in [1e-3, 1e-2])
    assert all(60 <= c <= 140 for c in counts.values()), counts


def test_int_and_quantised_distributions():
    ints = _sample({"min": 2, "max": 6}, n=100)
    assert set(ints) == {2, 3, 4, 5, 6}
    steps = _sample({"distribution": "q_uniform", "min": 0.0, "max": 1.0, "q": 0.25}, n=50)
    assert set(steps) <= {0.0, 0.25, 0.5, 0.75, 1.0}
    quantised = _sample({"distribution": "q_log_uniform_values", "min": 16, "max": 1024, "q": 16}, n=100)
    assert np.all(quantised % 16 == 0) and quantised.min() >= 16 and quantised.max() <= 1024


def test_wandb_only_distribution_is_refused_by_optuna():
    param = parse_param("x", {"distribution": "normal", "mu": 0, "sigma": 1})
    trial = optuna.create_study().ask()
    with pytest.raises(SweepError, match="supported only by --backend wandb"):
        suggest(trial, param)
