"""Stable Diffusion at full size: the SD v1.5 U-Net, the VAE decoder and the CLIP text encoder,
minidiff against diffusers / transformers on the same weights, side by side.

The logic lives in minidiff/bench/sd.py (also run by ``minidiff bench --sd``); this script writes
its JSON beside itself:

    python bench/sd.py                      # all three parts at full size (about 10 minutes on 2 cores)
    python bench/sd.py --parts unet --repeats 3
    python bench/sd.py --tiny               # small configs of the same blocks, in seconds
"""

from __future__ import annotations

import sys
from pathlib import Path

from minidiff.bench.sd import main

if __name__ == "__main__":
    sys.exit(main(prog="bench/sd.py", default_json=str(Path(__file__).resolve().parent / "sd.json")))
