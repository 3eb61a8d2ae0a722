"""4.pretrain.py on a disk that fills up during one checkpoint (test_train_deepspeed.py runs it under the DeepSpeed
launcher): on rank $FULL_DISK_RANK, writing any file of checkpoint $FULL_DISK_CHECKPOINT fails for real, as it does
on a full disk (`written_to_a_full_disk`). The other ranks write theirs."""
import os
import resource
import signal
import sys
from pathlib import Path

import torch

# Smaller than any model or optimizer file of the tests' tiny model, larger than a run's logs.
FULL_AT_BYTES = 200_000


def written_to_a_full_disk(save, obj, path, *args, **kwargs):
    """`save(obj, path, ...)` with this process's file size limit (RLIMIT_FSIZE) lowered to FULL_AT_BYTES: the file
    is written up to there and the write then fails in the operating system, as on a full disk (torch.save raises
    its own RuntimeError then, not an OSError). The process must ignore SIGXFSZ, which would end it."""
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FULL_AT_BYTES, limits[1]))
    try:
        return save(obj, path, *args, **kwargs)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from mateconv.train.command import main

    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if os.environ["RANK"] == os.environ["FULL_DISK_RANK"] and os.environ["FULL_DISK_CHECKPOINT"] in str(path):
            return written_to_a_full_disk(real_save, obj, path, *args, **kwargs)
        return real_save(obj, path, *args, **kwargs)

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    torch.save = full_disk
    sys.exit(main("pretrain"))
