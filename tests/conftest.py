"""Settings for the whole test tree."""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several test processes share a few cores: one OpenMP thread each (torch reads this when it
    # is first imported; subprocesses such as the demo and torchrun inherit it). Spinning OpenMP
    # threads of oversubscribed processes made the end-to-end tests 10x slower.
    os.environ["OMP_NUM_THREADS"] = "1"
