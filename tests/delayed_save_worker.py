"""``scripts/train_datamux.py`` with process 1 slowed down while it writes its part of a checkpoint.

Used by tests/test_distributed.py under torchrun: before every process waited for the others,
process 0 renamed the checkpoint folder while process 1 was still writing its RNG state into it.
"""
import os
import sys
import time
from pathlib import Path

import accelerate.accelerator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
DELAY = float(os.environ.get("MUX_TEST_SAVE_DELAY", "3"))
_original = accelerate.accelerator.save_accelerator_state


def _slow_on_process_1(*args, **kwargs):
    if kwargs.get("process_index", args[5] if len(args) > 5 else None) == 1:
        time.sleep(DELAY)
    return _original(*args, **kwargs)


accelerate.accelerator.save_accelerator_state = _slow_on_process_1

import train_datamux  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_datamux.main(sys.argv[1:]))
