"""twindiff PyTorch + Accelerate backend (GPUs): runs as `accelerate launch -m torchdiff.<task>`."""
