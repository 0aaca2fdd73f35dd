#!/usr/bin/env python3
"""Entry point: ``mpirun -np N python train_hvd.py [flags]`` (same as ``unet-train``)."""
import sys

from unet.run.train import main

if __name__ == "__main__":
    sys.exit(main())
