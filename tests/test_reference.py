"""benchmarks.reference: the relative errors every comparison is made with."""

import numpy as np
import pytest
import torch

from benchmarks.reference import norm_err, rel_err


def test_relative_errors_in_float64_for_tensors_and_arrays():
    ref = torch.tensor([1.1, -4.3, 2.7], dtype=torch.float32)
    ours = ref + torch.tensor([0.0, 1e-6, -2e-6])
    expected = np.abs(ours.double().numpy() - ref.double().numpy()).max() / np.abs(ref.double().numpy()).max()
    assert rel_err(ours, ref) == pytest.approx(expected, rel=1e-12)
    assert rel_err(ours.numpy(), ref) == rel_err(ours, ref.numpy()) == rel_err(ours, ref)
    assert norm_err(ours, ref) == pytest.approx(np.linalg.norm((ours - ref).double().numpy()) /
                                                np.linalg.norm(ref.double().numpy()), rel=1e-12)
    assert rel_err(ref, ref) == 0.0 and rel_err(ref.to(torch.bfloat16), ref) > 0
    assert rel_err(np.zeros(0), np.zeros(0)) == 0.0 and rel_err(np.ones(1), np.zeros(0)) == float("inf")
