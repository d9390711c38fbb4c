"""PyTorch references the ports are checked against; test-only, never imported by abaw_jax."""
