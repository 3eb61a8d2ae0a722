"""A training stage (`python sample_ids_driver.py pretrain|dpo FLAGS...`, alone or under the DeepSpeed launcher) that
records every sample it reads: rank r appends the index of each training sample to `$SAMPLE_IDS_DIR/rank<r>.txt` as
the loader fetches it, and the directory and index of each held-out one (validation, DPO's forgetting data) to
`held_out_rank<r>.txt`. test_train_world_size.py reads the first to check that runs resumed on another number of ranks
neither repeat nor skip a sample, test_dpo_deepspeed.py the second to check that the ranks split an evaluation."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mateconv.data.shards import DPOTokens, PretrainTokens, SFTTokens  # noqa: E402
from mateconv.train.command import main  # noqa: E402


def recording(get_item, log_dir: Path):
    """`get_item` (a dataset class's __getitem__) that also appends the sample to the rank's log."""
    def get(self, i):
        rank, training = os.environ.get("RANK", "0"), self.directory.name == "train"
        with open(log_dir / f"{'' if training else 'held_out_'}rank{rank}.txt", "a") as log:
            log.write(f"{i}\n" if training else f"{self.directory} {i}\n")
        return get_item(self, i)
    return get


if __name__ == "__main__":
    log_dir = Path(os.environ["SAMPLE_IDS_DIR"])
    log_dir.mkdir(parents=True, exist_ok=True)
    for cls in (PretrainTokens, DPOTokens, SFTTokens):
        cls.__getitem__ = recording(cls.__getitem__, log_dir)
    stage = next(arg for arg in sys.argv[1:] if not arg.startswith("-"))  # the launcher puts --local_rank first
    sys.argv.remove(stage)
    sys.exit(main(stage))
