"""The joining of batch chunks' outputs as they come (``engine.batch.ChunkJoin``), against ``torch.cat``."""
import threading

import pytest
import torch

from optlayers.engine.batch import ChunkJoin, map_chunks_joined


def _chunk(start: int, size: int) -> tuple:
    """A chunk's outputs: a matrix, the same matrix again (one tensor), a view of the same storage
    that is other data, None, an empty tensor and a ragged output (rows of its own length)."""
    matrix = torch.arange(start, start + size, dtype=torch.float64).reshape(size, 1, 1).expand(size, 2, 3).contiguous()
    vector = matrix[:, 0, :]  # the same storage, other data than the matrix
    ragged = torch.full((size, start // 2 % 2), float(start))  # chunks of two: widths 0, 1, 0, 1
    return matrix, matrix, vector, None, torch.empty(size, 0), ragged


def test_chunks_placed_out_of_order_and_from_threads_join_as_torch_cat():
    chunks = {start: _chunk(start, 2) for start in range(0, 8, 2)}
    join = ChunkJoin(8, ragged=(5,))
    threads = [threading.Thread(target=join.place, args=(slice(start, start + 2), outs)) for start, outs in reversed(chunks.items())]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    matrix, again, vector, none, empty, ragged = join.joined()
    expected = [torch.cat([chunks[start][i] for start in sorted(chunks)]) for i in (0, 2, 4)]
    assert torch.equal(matrix, expected[0]) and again is matrix  # the same data in every chunk: one tensor
    assert torch.equal(vector, expected[1]) and vector.data_ptr() != matrix.data_ptr()
    assert none is None and empty.shape == (8, 0)
    assert [part.shape for part in ragged] == [(2, 0), (2, 1), (2, 0), (2, 1)]
    assert all(part is chunks[start][5] for start, part in zip(sorted(chunks), ragged))  # in batch order, as given


def test_outputs_that_stop_being_the_same_data_get_tensors_of_their_own():
    join = ChunkJoin(4)
    first = torch.ones(2, 3)
    join.place(slice(0, 2), (first, first))
    join.place(slice(2, 4), (torch.full((2, 3), 2.0), torch.full((2, 3), 3.0)))
    one, other = join.joined()
    assert torch.equal(one, torch.tensor([1.0, 1, 2, 2]).repeat_interleave(3).reshape(4, 3))
    assert torch.equal(other, torch.tensor([1.0, 1, 3, 3]).repeat_interleave(3).reshape(4, 3))


def test_misuse_is_refused():
    with pytest.raises(ValueError, match=r"batch must be an int >= 1, got 0"):
        ChunkJoin(0)
    join = ChunkJoin(4)
    with pytest.raises(RuntimeError, match="no chunk was placed"):
        join.joined()
    join.place(slice(0, 2), (torch.ones(2),))
    with pytest.raises(RuntimeError, match="a chunk gave 2 outputs where the first gave 1"):
        join.place(slice(2, 4), (torch.ones(2), torch.ones(2)))



def test_a_chunk_whose_output_has_another_shape_is_refused_not_broadcast():
    """A (2, 3) output where the first chunk's was (2, 3, 3) (a diagonal factor beside a dense one)
    would broadcast into its place without a word; a (1, 3) one along the batch likewise."""
    join = ChunkJoin(4)
    join.place(slice(0, 2), (torch.ones(2, 3, 3), torch.ones(2, 3)))
    with pytest.raises(RuntimeError, match=r"output 0 of the chunk 2:4 has shape \(2, 3\) where the first chunk's had \(4, 3, 3\)"):
        join.place(slice(2, 4), (torch.ones(2, 3), torch.ones(2, 3)))
    with pytest.raises(RuntimeError, match=r"output 1 of the chunk 2:4 has shape \(1, 3\)"):
        join.place(slice(2, 4), (torch.ones(2, 3, 3), torch.ones(1, 3)))

def test_chunks_mapped_and_joined_give_the_outputs_joined_and_the_other_results_in_batch_order():
    data = torch.arange(12.0).reshape(6, 2)
    outs, results = map_chunks_joined(lambda part: ((data[part] * 2, None), part.start), 6, 1, 2)
    assert torch.equal(outs[0], data * 2) and outs[1] is None
    assert results == [0, 2, 4]
