"""Every kernel op and implementation against the reference and PyTorch, with the machine's ceilings.

The logic lives in minidiff/bench/kernels.py (also run by ``minidiff bench``); this script writes
its JSON beside itself:

    python bench/kernels.py                       # every op, 2-3 U-Net shapes each
    python bench/kernels.py --quick               # one shape per op, 3 repeats
    python bench/kernels.py --ops softmax im2col --repeats 20
"""

from __future__ import annotations

import sys
from pathlib import Path

from minidiff.bench.kernels import main

if __name__ == "__main__":
    sys.exit(
        main(prog="bench/kernels.py", default_json=str(Path(__file__).resolve().parent / "kernels.json"))
    )
