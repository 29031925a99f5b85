"""The shared state-dict pairing check names the first offending key."""

import pytest
import torch

from pymerge._util.checks import check_state_pair


def test_matching_states_pass_and_are_untouched():
    a = {"w": torch.ones(2, 3), "b": torch.zeros(2)}
    b = {"b": torch.ones(2), "w": torch.zeros(2, 3)}  # key order may differ
    check_state_pair(a, b, "A", "B", same_device=True)
    assert torch.equal(a["w"], torch.ones(2, 3)) and torch.equal(b["w"], torch.zeros(2, 3))


@pytest.mark.parametrize(
    ("a", "b", "message"),
    [
        (
            {"w": torch.ones(2), "x": torch.ones(1)},
            {"w": torch.ones(2)},
            "'x' is in A but not in B",
        ),
        (
            {"w": torch.ones(2)},
            {"w": torch.ones(2), "y": torch.ones(1)},
            "'y' is in B but not in A",
        ),
        (
            {"w": torch.ones(2, 3)},
            {"w": torch.ones(3, 2)},
            r"'w' has shape \(2, 3\) in A but \(3, 2\) in B",
        ),
        (
            {"w": torch.ones(2)},
            {"w": torch.ones(2, device="meta")},
            "'w' is on cpu in A but meta in B",
        ),
    ],
)
def test_mismatches_name_the_key(a, b, message):
    with pytest.raises(ValueError, match=message):
        check_state_pair(a, b, "A", "B", same_device=True)
