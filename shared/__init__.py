"""Backend-neutral layer of twindiff: config, diffusion math, data, prompts, offline assets."""
