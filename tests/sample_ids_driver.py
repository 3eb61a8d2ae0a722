"""A training stage (`python sample_ids_driver.py pretrain|dpo FLAGS...`, alone or under the DeepSpeed launcher) that
records every training sample it reads: rank r appends each index to `$SAMPLE_IDS_DIR/rank<r>.txt` as the loader
fetches it (validation data is not recorded). test_train_world_size.py reads them to check that runs resumed on
another number of ranks neither repeat nor skip a sample."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mateconv.data.shards import DPOTokens, PretrainTokens  # noqa: E402
from mateconv.train.command import main  # noqa: E402


def recording(get_item, log_dir: Path):
    """`get_item` (a dataset class's __getitem__) that also appends the index of a training sample to the log."""
    def get(self, i):
        if self.directory.name == "train":
            with open(log_dir / f"rank{os.environ.get('RANK', '0')}.txt", "a") as log:
                log.write(f"{i}\n")
        return get_item(self, i)
    return get


if __name__ == "__main__":
    log_dir = Path(os.environ["SAMPLE_IDS_DIR"])
    log_dir.mkdir(parents=True, exist_ok=True)
    for cls in (PretrainTokens, DPOTokens):
        cls.__getitem__ = recording(cls.__getitem__, log_dir)
    stage = next(arg for arg in sys.argv[1:] if not arg.startswith("-"))  # the launcher puts --local_rank first
    sys.argv.remove(stage)
    sys.exit(main(stage))
