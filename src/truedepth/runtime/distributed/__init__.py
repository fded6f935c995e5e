"""Tensor parallelism under torchrun: process group, validation, sharding."""
