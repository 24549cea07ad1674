"""Shared pytest configuration for the xent_jax test suite."""

from hypothesis import settings

settings.register_profile(
    "ci", database=None, derandomize=True, deadline=None, max_examples=25
)
settings.load_profile("ci")
