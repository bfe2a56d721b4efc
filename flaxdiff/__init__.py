"""twindiff JAX/Flax backend (TPU-native): models, objective, trainer. Runs as `python -m flaxdiff.<task>`."""


def train(cfg, **overrides):
    """Trains a `twindiff.config(...)` on JAX in this process; returns a `twindiff.TrainResult`
    (output folder, summary, loss curve). `overrides` are flag values (``max_train_steps=10``)."""
    from shared import api

    return api.train(cfg, backend="flax", **overrides)
