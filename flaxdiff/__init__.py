"""twindiff JAX/Flax backend (TPU-native): models, objective, trainer. Runs as `python -m flaxdiff.<task>`."""
