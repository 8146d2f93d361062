"""GFLOPs per image of ViT-B/16, ConcatPlexer (1)-(4) and the Image Multiplexer beside the paper's Table 3,
and (``--speed``) their measured images/s: see :mod:`mux.vision_flops` for what is counted and how.

    .venv/bin/python scripts/vision_flops.py --json runs/vision_flops/flops.json
    .venv/bin/python scripts/vision_flops.py --speed --batch 16                             # this CPU
    .venv/bin/python scripts/vision_flops.py --speed --device cuda --dtype bf16 --batch 256   # a GPU
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mux.vision_flops import main  # noqa: E402

if __name__ == "__main__":
    main()
