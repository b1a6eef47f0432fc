"""The U-Net training step and sampling forward pass: minidiff against PyTorch, side by side.

The logic lives in minidiff/bench/unet.py (also run by ``minidiff bench --unet``); this
script writes its JSON beside itself:

    python bench/unet.py                     # UNet(1, 32, (1,2,2), 1, (8,), 32, norm_groups=8), batch 32
    python bench/unet.py --repeats 7 --rounds 6
    python bench/unet.py --batch 32 --image-size 16 --mults 1 2    # the digits model
"""

from __future__ import annotations

import sys
from pathlib import Path

from minidiff.bench.unet import main

if __name__ == "__main__":
    sys.exit(main(prog="bench/unet.py", default_json=str(Path(__file__).resolve().parent / "unet.json")))
