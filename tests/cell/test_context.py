"""Context parallelism of the mLSTM cell (`cell.context`): on 8 simulated CPU devices, split over
cp = 2, 4, 8 devices inside `jax.shard_map`, the outputs, the final state and the gradients equal
the one-device chunkwise form's (float32, ≤ 1e-5 relative), with document borders inside segments
and on segment boundaries, S_local a multiple of the chunk size and not; the gate extremes of
tests/cell/test_edge_cases.py stay finite and equal; an invalid input reaches only later outputs.

The multi-device runs are one worker subprocess (tests/cell/context_worker.py), started once per
session by the ``results`` fixture; the one-device references are computed in the worker too.
"""

import pytest

from tests.multiprocess import collect, once_per_session, start_worker, worker_result


TOLERANCE = 1e-5
ERRORS = ("h", "c", "n", "dq", "dk", "dv", "di", "df")


@pytest.fixture(scope="session")
def results(tmp_path_factory) -> dict:
    def compute(folder):
        proc = start_worker("tests.cell.context_worker", [], 8, folder)
        return {"value": collect("context_worker", proc, timeout=900)}

    return worker_result(once_per_session(tmp_path_factory, "cell_context", compute)["value"])


def _check(case: dict) -> None:
    for name in ERRORS:
        assert case[name] <= TOLERANCE, (name, case)
    assert case["m"] == 0.0, case  # the stabiliser is the one-device run's own
    assert case["same_final_on_every_rank"], case
    assert case["finite"], case


@pytest.mark.slow
@pytest.mark.parametrize("case", ["cp2_s6", "cp4_s8", "cp8_s3"])
def test_context_parallel_equals_one_device(results, case):
    """cp ∈ {2, 4, 8}; S_local = 8 (a multiple of the chunk of 4), 6 and 3 (not; 3 is shorter
    than a chunk); borders (f̃ = -25 and f̃ = -inf) inside segments and on boundaries."""
    assert results["devices"] == 8
    _check(results["cell"][case])


@pytest.mark.slow
def test_context_parallel_by_ppermute_equals_one_device(results):
    """The exchange as log2(cp) + 1 ppermute rounds (cp = 8, S_local = 3, borders as above): the
    same outputs and gradients; the final state on the last device; the stabiliser to rounding
    (its sums associate differently)."""
    case = results["cell"]["cp8_s3_ppermute"]
    for name in ERRORS:
        assert case[name] <= TOLERANCE, (name, case)
    assert case["m"] <= 1e-5 and case["finite"], case


@pytest.mark.slow
@pytest.mark.parametrize("case", ["wide", "extreme", "infinite_gates"])
def test_context_parallel_gate_extremes(results, case):
    """The edge-case tests' wide and extreme gate ranges, ĩ = -inf (a head and a whole segment that
    write nothing), f̃ = ±inf: finite, and equal to one device."""
    _check(results["extreme"][case])


@pytest.mark.slow
def test_context_parallel_invalid_input_reaches_only_later_outputs(results):
    """A NaN key in rank 1's segment: outputs before it equal one device's, outputs from it on are
    NaN exactly where one device's are, and the gradient of the earlier outputs is finite and
    equal to one device's (nothing leaks backwards through the exchange)."""
    case = results["invalid"]
    assert case["earlier_equal"] <= TOLERANCE, case
    assert case["later_nan"] and case["nan_only_there"], case
    assert case["grads_finite"], case
    assert case["grads_equal"] <= TOLERANCE, case


@pytest.mark.slow
@pytest.mark.parametrize("case", ["cp2_s5", "cp4_s3", "cp8_s4"])
def test_conv_halo_equals_one_device(results, case):
    """The causal conv (K = 4) with its K - 1 steps of left context from the previous device
    (`nn.context.with_left_context`, one ppermute): outputs and gradients (input, kernel, bias)
    equal the conv on the whole sequence."""
    conv = results["conv"][case]
    assert conv["y"] <= TOLERANCE and conv["grads"] <= TOLERANCE, conv


@pytest.mark.slow
def test_conv_halo_needs_one_hop(results):
    """A segment shorter than the conv's left context is a ValueError naming the axis and sizes."""
    message = results["conv"]["short_segment_error"]
    assert "'cp' has 2 steps" in message and "kernel size 4" in message, message


@pytest.mark.slow
def test_model_hooks_on_cp_equal_one_device(results):
    """`parallel.with_context_parallel` sets the cell's and the conv's ``context_axis``: a tiny
    model of ``mlstm`` layers (conv K = 4, memory reset at borders) on cp = 4 inside a shard_map
    gives the one-device logits, and ``call_with_state`` from a non-zero state its logits and
    (on the last device) the state after the whole sequence."""
    case = results["model"]
    assert max(case.values()) <= TOLERANCE, case


@pytest.mark.slow
def test_llama_attention_on_cp_equals_one_device(results):
    """Llama attention with ``context_axis`` (`llama.context`: K/V all-gathered, the causal mask
    offset by the segment, per-segment document numbers made global) on cp = 4: outputs and
    input gradients equal one device's, with borders inside a segment and on a boundary."""
    case = results["llama"]
    assert case["y"] <= TOLERANCE and case["dx"] <= TOLERANCE, case
