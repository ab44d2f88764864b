"""Batched, differentiable quadratic programs."""
