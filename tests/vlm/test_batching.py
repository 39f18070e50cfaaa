"""Left padding of ragged id rows: exact layout, empty rows, dtype."""
from __future__ import annotations

import pytest
import torch

from vlm_treegrpo.vlm.batching import content_groups, left_pad_ids


def test_left_pad_ids_right_aligns_each_row():
    ids, mask = left_pad_ids([torch.tensor([5, 6, 7]), torch.tensor([], dtype=torch.long), torch.tensor([9])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 0], [0, 0, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 0], [0, 0, 1]]
    assert ids.dtype == torch.long and mask.dtype == torch.long


def test_left_pad_ids_keeps_the_rows_dtype_and_needs_a_row():
    ids, _ = left_pad_ids([torch.tensor([1, 2], dtype=torch.int32), torch.tensor([3], dtype=torch.int32)], pad_id=-1)
    assert ids.dtype == torch.int32 and ids.tolist() == [[1, 2], [-1, 3]]
    with pytest.raises(ValueError, match="at least one"):
        left_pad_ids([], 0)


def test_content_groups_number_equal_tensors_by_first_occurrence():
    a, b = torch.arange(6.0).view(2, 3), torch.ones(2, 3)
    assert content_groups([a, b, a.clone(), b, torch.arange(6.0).view(3, 2)]) == [0, 1, 0, 1, 2]  # same values, other shape: new
    assert content_groups([b, a]) == [0, 1] and content_groups([]) == []
    assert content_groups([a, a + 1e-6]) == [0, 1]  # equality is exact
