"""4.pretrain.py on a disk that fills up during one checkpoint (test_train_deepspeed.py runs it under the DeepSpeed
launcher): on rank $FULL_DISK_RANK, writing any file of checkpoint $FULL_DISK_CHECKPOINT fails with ENOSPC after part
of it is written. The other ranks write theirs."""
import errno
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mateconv.train.stages import main  # noqa: E402

real_save = torch.save


def full_disk(obj, path, *args, **kwargs):
    if os.environ["RANK"] == os.environ["FULL_DISK_RANK"] and os.environ["FULL_DISK_CHECKPOINT"] in str(path):
        with open(path, "wb") as out:
            out.write(b"PK" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return real_save(obj, path, *args, **kwargs)


torch.save = full_disk
sys.exit(main("pretrain"))
