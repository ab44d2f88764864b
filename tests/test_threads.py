"""threads.py: slices cover the batch exactly once and the caller's thread count survives."""
import pytest
import torch

from optlayers import threads


@pytest.mark.parametrize("batch, count", [(7, 3), (2049, 2), (5, 5), (1, 1)])
def test_slices_cover_the_batch_once(batch, count):
    parts = threads.map_slices(lambda part: list(range(batch))[part], batch, count)
    assert len(parts) == count
    assert sum(parts, []) == list(range(batch))


def test_slices_with_a_half_precision_default_dtype():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        parts = threads.map_slices(lambda part: (part.start, part.stop), 2049, 2)
    finally:
        torch.set_default_dtype(previous)
    assert parts[0][0] == 0 and parts[-1][1] == 2049 and parts[0][1] == parts[1][0]


def test_thread_count_is_restored_and_workers_run_single_threaded():
    before = torch.get_num_threads()
    inside = threads.map_slices(lambda part: torch.get_num_threads(), 4, 2)
    assert inside == [1, 1]
    assert torch.get_num_threads() == before
