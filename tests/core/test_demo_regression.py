"""The demo's results do not move under refactoring: every method preset, three iterations on the
shipped shapes model, equal to the record in ``golden/demo_iterations.json``.

The record was written by ``golden/demo_run.py`` at a commit whose full ``make demo`` reproduced the
README's rewards. A change that is meant to change results regenerates it (and says so in its
commit); any other change that moves a number here has changed what the demo computes. The
tolerance absorbs the rounding differences between CPU instruction sets (AVX2 and AVX-512 kernels
sum in different orders), not a change of algorithm: one different noise key, window, advantage or
minibatch order moves these numbers by orders of magnitude more.
"""

import json
import math

import pytest

from tests.core.golden.demo_run import GOLDEN, METHODS, run_methods


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_methods(tmp_path_factory.mktemp("demo"))


@pytest.mark.parametrize("method", METHODS)
def test_demo_iterations_match_the_record(results, method):
    golden = json.loads(GOLDEN.read_text())[method]
    got = results[method]
    assert len(got["iterations"]) == len(golden["iterations"]) == 3
    for k, (row, want) in enumerate(zip(got["iterations"], golden["iterations"], strict=True)):
        assert row.keys() == want.keys()
        for key, value in want.items():
            tolerance = 1e-3 if key in ("loss/policy", "policy/grad_norm") else 1e-5
            assert math.isclose(row[key], value, rel_tol=tolerance, abs_tol=1e-6), (method, k + 1, key, row[key], value)
    assert math.isclose(got["weights_sum"], golden["weights_sum"], rel_tol=1e-6)
    assert math.isclose(got["weights_sq_sum"], golden["weights_sq_sum"], rel_tol=1e-8)
    # the update moved the weights: the record pins a trained model, not the base one
    assert any(abs(r["policy/grad_norm"]) > 0 for r in golden["iterations"])
