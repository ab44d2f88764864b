"""A batched primal-dual interior point method for cone programs, in torch (CPU or CUDA)."""
