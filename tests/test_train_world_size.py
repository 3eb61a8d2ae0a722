"""Beyond one machine (CPU/gloo, real DeepSpeed launchers): two simulated nodes (two launchers on loopback started
with the pipeline's `--hostfile --no_ssh --node_rank` command, one rank each) train exactly like one node with two
ranks; ZeRO-2 and ZeRO-3 checkpoints resume on another number of ranks (2 -> 1 -> 2 ranks, the global batch kept)
with the losses of an uninterrupted run and every training sample read exactly once; DPO likewise (2 -> 1)."""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import REPO, losses, single_thread_env
from mateconv import pipeline
from mateconv.pipeline import Nodes, PipelineError, launcher, read_hostfile
from mateconv.procs import free_port
from sample_ids_driver import recording

pytestmark = pytest.mark.slow
DRIVER = REPO / "tests" / "sample_ids_driver.py"
GLOBAL_BATCH = 4  # samples per step over all ranks: 2 ranks x 2 or 1 rank x 4 see the same samples in a step
PHASE = 3  # steps per launch of a chain
PHASES = (2, 1, 2)  # ranks of the launches of a pretraining chain; DPO runs the first two
TOLERANCE = 2e-5  # float rounding across ranks and engines; a lost optimizer state or a data shift is far above


def train_flags(tiny_flags, out: Path, stage: str, zero: int, ranks: int, max_steps: int, **extra) -> list[str]:
    """A constant learning rate after warmup, so that a phase ending at max_steps schedules like the whole run."""
    return tiny_flags(out, stage, engine="deepspeed", zero_stage=zero, batch_size=GLOBAL_BATCH // ranks,
                      max_steps=max_steps, min_lr_ratio=1.0, save_interval_steps=PHASE, val_data_path="", **extra)


def launch(ranks: int, args: list[str], sample_ids: Path) -> str:
    """The driver on `ranks` ranks: two under `deepspeed --num_gpus 2`, one as a plain process (DeepSpeed engine)."""
    command = ([str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(free_port())]
               if ranks == 2 else [sys.executable])
    result = subprocess.run([*command, str(DRIVER), *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**single_thread_env(), "SAMPLE_IDS_DIR": str(sample_ids)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def read_ids(directory: Path) -> list[int]:
    return [int(line) for path in sorted(directory.glob("rank*.txt")) for line in path.read_text().split()]


def reference_run(tiny_flags, out: Path, stage: str, steps: int, **extra) -> list[int]:
    """The uninterrupted run: plain PyTorch, one process, the global batch on one rank; its samples in order."""
    from mateconv.config import parse_config
    from mateconv.data.shards import DPOTokens, PretrainTokens
    from mateconv.train.stages import RECIPES, run

    with pytest.MonkeyPatch.context() as patch:
        for cls in (PretrainTokens, DPOTokens):
            patch.setattr(cls, "__getitem__", recording(cls.__getitem__, out))
        out.mkdir(parents=True)
        flags = train_flags(tiny_flags, out, stage, 0, 1, steps, **extra) + ["--engine", "torch"]
        run(RECIPES[stage], parse_config(flags, RECIPES[stage].defaults))
    return read_ids(out)


def chain(tiny_flags, root: Path, stage: str, zero: int, phases: tuple[int, ...], **extra) -> list[str]:
    """Launches that each train PHASE more steps from the previous one's checkpoint, on phases[i] ranks."""
    outputs = []
    for index, ranks in enumerate(phases):
        args = [stage, *train_flags(tiny_flags, root / "run", stage, zero, ranks, PHASE * (index + 1), **extra)]
        outputs.append(launch(ranks, args, root / f"ids{index}"))
    return outputs


def check_chain(root: Path, reference: Path, reference_ids: list[int], phases: tuple[int, ...]) -> None:
    expected = losses(reference)
    resumed = losses(root / "run")
    assert sorted(resumed) == list(range(1, PHASE * len(phases) + 1))
    for step, loss in resumed.items():
        assert loss == pytest.approx(expected[step], abs=TOLERANCE), (step, loss, expected[step])
    seen = []
    for index in range(len(phases)):  # each launch reads the next PHASE global batches of the reference's order
        ids = read_ids(root / f"ids{index}")
        window = reference_ids[index * PHASE * GLOBAL_BATCH:(index + 1) * PHASE * GLOBAL_BATCH]
        assert sorted(ids) == sorted(window), f"launch {index} on {phases[index]} rank(s)"
        seen += ids
    assert len(seen) == len(set(seen)) == PHASE * len(phases) * GLOBAL_BATCH


@pytest.fixture(scope="module")
def pretrain_reference(tiny_flags, tmp_path_factory) -> tuple[Path, list[int]]:
    out = tmp_path_factory.mktemp("reference") / "pretrain"
    return out, reference_run(tiny_flags, out, "pretrain", PHASE * len(PHASES))


@pytest.fixture(scope="module")
def zero2_chain(tiny_flags, tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("zero2")
    return root, chain(tiny_flags, root, "pretrain", 2, PHASES)


def test_two_nodes_on_loopback_train_like_one_node_with_two_ranks(tiny_flags, zero2_chain, tmp_path):
    """The pipeline's multi-node command without ssh, started once per node, equals `deepspeed --num_gpus 2`."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes, one rank each\nlocalhost slots=1\n127.0.0.1 slots=1\n")
    assert read_hostfile(hostfile) == ["localhost", "127.0.0.1"]
    port = free_port()
    out = tmp_path / "run"
    flags = train_flags(tiny_flags, out, "pretrain", 2, 2, PHASE)
    nodes = [subprocess.Popen([*launcher({}, "4.pretrain.py", Nodes(hostfile, "127.0.0.1", port, rank)), *flags],
                              cwd=REPO, env=single_thread_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for rank, (node, output) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {rank}:\n{output[-3000:]}"
        assert f"nnodes=2, num_local_procs=1, node_rank={rank}" in output  # DeepSpeed's per-node launcher
    single_node = losses(zero2_chain[0] / "run")
    two_nodes = losses(out)
    assert sorted(two_nodes) == [1, 2, 3]
    for step, loss in two_nodes.items():
        assert loss == pytest.approx(single_node[step], abs=1e-6), step
    assert (out / "checkpoints" / "step_00000003" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()


def test_zero2_resumes_on_fewer_and_more_ranks(zero2_chain, pretrain_reference):
    root, outputs = zero2_chain
    assert "converting it to a universal checkpoint" in outputs[1] and "resumed from" in outputs[1]
    assert "written by 1 ranks, this run has 2" in outputs[2]
    check_chain(root, *pretrain_reference, PHASES)


def test_zero3_resumes_on_fewer_and_more_ranks(tiny_flags, pretrain_reference, tmp_path):
    outputs = chain(tiny_flags, tmp_path, "pretrain", 3, PHASES)
    assert "written by 2 ranks, this run has 1" in outputs[1]
    check_chain(tmp_path, *pretrain_reference, PHASES)


def test_dpo_resumes_on_fewer_ranks(tiny_flags, tiny_pretrain_model, tiny_tokens, tmp_path):
    dpo = {"init_from": tiny_pretrain_model, "forget_data_paths": tiny_tokens / "pretrain" / "val",
           "eval_batches": 1, "learning_rate": 5e-4}
    reference = tmp_path / "reference"
    reference_ids = reference_run(tiny_flags, reference, "dpo", PHASE * 2, **dpo)
    outputs = chain(tiny_flags, tmp_path, "dpo", 2, PHASES[:2], **dpo)
    assert "written by 2 ranks, this run has 1" in outputs[1]
    check_chain(tmp_path, reference, reference_ids, PHASES[:2])


def test_bad_hostfile_is_named_with_its_line(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=2\nnode-b\n")
    with pytest.raises(PipelineError, match=rf"{hostfile}:2: expected `HOST slots=N`"):
        read_hostfile(hostfile)
    hostfile.write_text("node-a slots=2\nnode-a slots=2\n")
    with pytest.raises(PipelineError, match=r":2: a host named twice"):
        read_hostfile(hostfile)


def test_a_node_without_ssh_waits_for_node_0s_other_stages(tmp_path, monkeypatch):
    """`--node_rank 1`: a stage that is not training is node 0's; this node waits for its artifact in the shared
    out/ instead of running it."""
    monkeypatch.setattr(pipeline, "FOLLOWER_POLL_S", 0.05)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    done = tmp_path / "out" / "data.done"
    preset = {"stages": {"data": {"module": "mateconv.no_such_module", "done": "out/data.done"}}}
    timer = threading.Timer(0.5, lambda: (done.parent.mkdir(exist_ok=True), done.touch()))
    timer.start()
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    try:  # the stage runner forwards these to its stage; pytest's own come back afterwards
        code = pipeline.run(preset, None, tmp_path / "logs", tmp_path / "out", Nodes(hostfile, "node-a", 29500, 1))
    finally:
        timer.join()
        for number, handler in handlers.items():
            signal.signal(number, handler)
    assert code == 0 and done.exists()
    assert not (tmp_path / "logs" / "data.log").exists()  # never started here
