"""Sampling at temperatures near 0 (issue 31, item 7): every positive temperature must behave.

`--temperature 1e-300` used to stream token 0: in float32 the temperature rounds to 0, the shifted best
logit becomes 0 / 0 = NaN and the draw falls through to index 0. Temperatures this small must choose
what greedy chooses, down to the smallest positive double; a normal temperature must still sample.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from runtime.generate.cli import main as cli_main
from runtime.generate.sampling import SamplingParams, choose

TINY_TEMPERATURES = [1e-8, 1e-30, 1e-300, 5e-324]  # 5e-324: the smallest positive (subnormal) double
V = 1000


def _logits(seed: int, rows: int = 8, scale: float = 4.0) -> np.ndarray:
    logits = (np.random.default_rng(seed).standard_normal((rows, V)) * scale).astype(np.float32)
    logits[:, 0] = logits.min() - 1  # token 0 is never the best, so a fall-through to index 0 shows
    return logits


def _float32_scaling(logits: np.ndarray, temperature: float, rng) -> np.ndarray:
    """The draw as it was before the fix: the temperature converted to float32 (negative control)."""
    with np.errstate(all="ignore"):
        shifted = (logits - logits.max(-1, keepdims=True)) / np.float32(temperature)
        probs = np.exp(shifted - shifted.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
    u = rng.random((len(probs), 1))
    return (probs.cumsum(-1) < u).sum(-1).clip(max=probs.shape[1] - 1)


@pytest.mark.parametrize("temperature", TINY_TEMPERATURES)
@pytest.mark.parametrize("filters", [{}, {"top_k": 50, "top_p": 0.9}])
def test_tiny_temperatures_choose_the_greedy_token(temperature, filters):
    params = SamplingParams(do_sample=True, temperature=temperature, **filters).validate()
    assert not params.greedy  # the sampling path is what is tested, not the greedy shortcut
    for seed in range(5):
        logits = _logits(seed)
        got = choose(logits, [[] for _ in logits], params, np.random.default_rng(seed))
        assert got.tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [1e-300, 5e-324])
def test_float32_scaling_fails_where_the_fix_holds(temperature):
    """Negative control: converted to float32 these temperatures are 0 and every row draws token 0."""
    logits = _logits(0)
    assert np.float32(temperature) == 0
    assert _float32_scaling(logits, temperature, np.random.default_rng(0)).tolist() == [0] * len(logits)


def test_tiny_temperature_with_extreme_logits_and_ties():
    """Logits near float32's limits still give the best token; exact ties share the mass between them."""
    params = SamplingParams(do_sample=True, temperature=1e-300)
    logits = np.full((1, V), -3e38, np.float32)
    logits[0, [7, 9]] = 3e38  # tied best
    logits[0, 8] = 2.9e38
    picks = {int(choose(logits, [[]], params, np.random.default_rng(s))[0]) for s in range(40)}
    assert picks == {7, 9}


def test_a_normal_temperature_still_samples():
    """Negative control for the tests above: at temperature 1 the draw is random, reproducible by seed."""
    params = SamplingParams(do_sample=True, temperature=1.0)
    logits = _logits(1, scale=1.0)
    draws = [choose(logits, [[] for _ in logits], params, np.random.default_rng(s)).tolist() for s in range(4)]
    assert draws[0] != logits.argmax(-1).tolist() and len({tuple(d) for d in draws}) > 1
    assert choose(logits, [[] for _ in logits], params, np.random.default_rng(0)).tolist() == draws[0]


def _cli_ids(tiny_artifact, capsys, *flags) -> list[int]:
    args = ["--model", str(tiny_artifact), "--prompt", "The harbour lights", "--max-new-tokens", "12",
            "--ignore-eos", "--json", *flags]
    assert cli_main(args) == 0
    return json.loads(capsys.readouterr().out)["token_ids"]


def test_cli_tiny_temperatures_give_the_greedy_ids(tiny_artifact, capsys):
    greedy = _cli_ids(tiny_artifact, capsys, "--greedy")
    assert len(set(greedy)) > 1 and set(greedy) != {0}
    for temperature in ("1e-300", "5e-324", "1e-8"):
        assert _cli_ids(tiny_artifact, capsys, "--temperature", temperature, "--seed", "3") == greedy, temperature
    # negative control: the artifact's own temperature samples something else with some seed
    assert any(_cli_ids(tiny_artifact, capsys, "--temperature", "1.5", "--seed", str(s)) != greedy for s in range(3))
