"""twindiff from Python: one config, either backend.

    import twindiff
    cfg = twindiff.config("digits.yaml", train_data_dir="digits/train")
    result = twindiff.train(cfg, backend="flax")      # or "torch"
    images = twindiff.sample(result.output_dir, num_images=16)

See `shared.api` for the arguments; the command line is `twindiff --help`.
"""

from shared.api import TrainResult, config, installed_backends, sample, train

__all__ = ["TrainResult", "config", "installed_backends", "sample", "train"]
