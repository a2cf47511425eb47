"""Multi-process finetuning: 2 gloo processes under torchrun match one process with the same global batch, for a
Hugging Face model and for the built-in GPT (DDP and FSDP2)."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import one_line_error, tiny_overrides
from selfreplay.errors import SelfReplayError
from selfreplay.train import distributed as dist_utils


def torchrun(args: list[str], nproc: int = 2, timeout: int = 180,
             entry: tuple[str, ...] = ("-m", "selfreplay", "finetune")) -> str:
    """``python -m torch.distributed.run --nproc_per_node N ENTRY ARGS`` on CPU (gloo); ENTRY is ``-m selfreplay
    finetune`` unless given (a script path)."""
    # PYTHONFAULTHANDLER: a rank that aborts (SIGABRT) prints every thread's Python stack, which tells a crash mid-run
    # from one at exit (see test_a_finished_rank_frees_its_process_group_before_exit)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONFAULTHANDLER": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           *entry, *args]  # --standalone: a free local rendezvous port
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers
        proc.communicate()
        raise
    if proc.returncode != 0:  # how far the run got (stdout), the workers' stacks and torchrun's report (stderr)
        pytest.fail(f"torchrun exited {proc.returncode}\n--- stdout\n{out[-2000:]}\n--- stderr\n{err[-12000:]}",
                    pytrace=False)
    return out


def one_process(args: list[str]) -> dict:
    from selfreplay.config import TrainConfig, load_config
    from selfreplay.train import train

    return train(load_config(TrainConfig, [], args), "finetune")


def metrics(run_dir) -> list[dict]:
    from selfreplay.evaluate.metrics import read_metrics

    return read_metrics(run_dir)  # the evaluation records


KEYS = ("train_loss", "train_ntp", "train_replay", "valid_loss", "valid_kl", "prev_loss", "forgetting")


def assert_same_run(a: list[dict], b: list[dict], tol: float = 1e-4) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert {k for k in KEYS if k in ra} == {k for k in KEYS if k in rb}, ra["step"]
        for key in KEYS:
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], abs=tol), (key, ra["step"])


def assert_same_weights(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------- Hugging Face

def hf_args(hf_files, run_dir, **extra) -> list[str]:
    """A tiny Llama finetune on the chats that takes a few seconds on one CPU core."""
    base = {"model.model_name_or_path": hf_files["llama"], "data.train": hf_files["chat"], "run_dir": run_dir,
            "model.dtype": "float32", "data.seq_len": 64, "data.valid_examples": 8, "data.batch_size": 8,
            "replay.batch_size": 4, "replay.length": 16, "replay.buffer": 4, "optim.lr": 3e-3,
            "optim.warmup_tokens": 0, "stop.steps": 4, "eval.every_steps": 2, "log.progress": False}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def hf_weights(run_dir) -> dict:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(run_dir / "model").state_dict()


def test_hf_ddp_two_processes_match_one_with_real_data_replay(hf_files, tmp_path):
    """Full finetuning with KL replay on old text (read whole, each rank taking its rows) and gradient
    accumulation: the same global batch gives the same losses and weights on 1 or 2 ranks."""
    pytest.importorskip("transformers")
    extra = {"replay.method": "kl", "replay.source": hf_files["text"], "eval.prev": hf_files["text"],
             "gradient_accumulation_steps": 2}
    one_process(hf_args(hf_files, tmp_path / "one", **extra))
    torchrun(hf_args(hf_files, tmp_path / "two", **extra))
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert_same_run(one, two)
    assert two[-1]["train_replay"] > 1e-4 and "prev_loss" in two[-1]
    assert_same_weights(hf_weights(tmp_path / "one"), hf_weights(tmp_path / "two"))


@pytest.mark.slow
def test_hf_fsdp2_lora_with_self_replay_runs_on_two_gloo_processes(hf_files, tmp_path):
    """FSDP2 (fully_shard) on CPU/gloo: LoRA + KL self-replay trains, each rank sampling its own replay, and the
    gathered, merged model loads with plain transformers; without replay it matches one process."""
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    lora = {"lora.r": 4, "lora.alpha": 16, "optim.lr": 2e-2, "distributed.strategy": "fsdp",
            "loss_chunk_size": 16}  # ranks then run different numbers of loss chunks: must not deadlock
    one_process(hf_args(hf_files, tmp_path / "one", **lora, **{"replay.method": "none"}))
    torchrun(hf_args(hf_files, tmp_path / "two", **lora, **{"replay.method": "none"}))
    assert_same_run(metrics(tmp_path / "one"), metrics(tmp_path / "two"))
    torchrun(hf_args(hf_files, tmp_path / "kl", **lora, **{"replay.source": "self", "replay.max_logprobs_gib": 0}))
    records = metrics(tmp_path / "kl")
    assert records[-1]["valid_loss"] < records[0]["valid_loss"] and records[-1]["valid_kl"] > 1e-4
    assert records[-1]["train_replay"] > 1e-4
    AutoModelForCausalLM.from_pretrained(tmp_path / "kl" / "model")


# ------------------------------------------------------------------------------------------- built-in GPT

def gpt_args(corpora, pretrained, run_dir, **extra) -> list[str]:
    """A finetune of conftest's tiny pretrained GPT on "es", KL replay of its own corpus ("en", source=prev)."""
    return tiny_overrides(run_dir, corpora["es"], **{
        "model.model_name_or_path": pretrained, "replay.method": "kl", "replay.source": "prev", "stop.steps": 4,
        "eval.every_steps": 2, "gradient_accumulation_steps": 2, **extra})


def gpt_weights(run_dir) -> dict:
    from selfreplay.models.builtin import load_gpt_run

    return {k: v.float() for k, v in load_gpt_run(run_dir).net.state_dict().items()}


@pytest.fixture(scope="module")
def gpt_one_process(corpora, pretrained, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("gpt") / "one"
    one_process(gpt_args(corpora, pretrained, run_dir))
    return run_dir


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_gpt_two_processes_match_one(strategy, corpora, pretrained, gpt_one_process, tmp_path):
    """The built-in GPT with KL replay of the teacher's corpus: DDP and FSDP2 on two gloo ranks make the same
    updates as one process (replay rows and their teacher targets are split by rank like the data)."""
    torchrun(gpt_args(corpora, pretrained, tmp_path / "two", **{"distributed.strategy": strategy}))
    one, two = metrics(gpt_one_process), metrics(tmp_path / "two")
    assert_same_run(one, two)
    assert two[-1]["train_replay"] > 1e-4 and two[-1]["prev_kl"] > 1e-4
    if strategy == "ddp":  # FSDP skips the weight-norm metrics (sharded parameters)
        assert two[-1]["drift"] == pytest.approx(one[-1]["drift"], abs=1e-4)
    assert_same_weights(gpt_weights(gpt_one_process), gpt_weights(tmp_path / "two"))
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["stop_reason"] == "length"


# Each rank runs the CLI's finetune, then counts the distributed wrappers of the model still alive (before any
# collection of its own): the process group they hold must be gone while the interpreter still runs.
_FREED_BEFORE_EXIT = """
import gc, sys
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel
from selfreplay.cli import main
main(["finetune", *sys.argv[1:]])
print("wrappers alive:", sum(isinstance(o, (DistributedDataParallel, FSDPModule)) for o in gc.get_objects()))
"""


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_finished_rank_frees_its_process_group_before_exit(strategy, corpora, pretrained, tmp_path):
    """DDP's and FSDP's wrappers sit in reference cycles that hold the gloo process group: freed only at the
    interpreter's exit, a rank sometimes aborted there ("terminate called without an active exception", SIGABRT)
    after its run had finished, and torchrun reported the run as failed."""
    script = tmp_path / "rank.py"
    script.write_text(_FREED_BEFORE_EXIT)
    out = torchrun(gpt_args(corpora, pretrained, tmp_path / "two", **{"distributed.strategy": strategy}),
                   entry=(str(script),))
    assert out.count("wrappers alive: 0") == 2, out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("method", [{"replay.target_kl": 0.001, "replay.coeff": 1.0},
                                    {"replay.method": "l2_init", "replay.coeff": 1.0}])
def test_budget_and_weight_anchor_on_two_processes_match_one(strategy, method, corpora, pretrained, tmp_path):
    """The budget's KL estimate is averaged over ranks (the multiplier stays the same on every rank); the
    l2_init anchor is sharded like the weights under FSDP2: both make one process's updates."""
    one_process(gpt_args(corpora, pretrained, tmp_path / "one", **method))
    torchrun(gpt_args(corpora, pretrained, tmp_path / "two", **method, **{"distributed.strategy": strategy}))
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert_same_run(one, two)
    assert [r["replay_coeff"] for r in one] == pytest.approx([r["replay_coeff"] for r in two], rel=1e-4)
    if "replay.target_kl" in method:
        assert one[-1]["replay_coeff"] > 1.0
    assert_same_weights(gpt_weights(tmp_path / "one"), gpt_weights(tmp_path / "two"))


# ------------------------------------------------------------------------------------------- one process

def test_single_process_helpers_are_no_ops(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = dist_utils.init_distributed("cpu")
    assert (info.rank, info.world_size, info.enabled) == (0, 1, False) and info.device == torch.device("cpu")
    assert dist_utils.env_world() == (0, 1, 0)
    assert dist_utils.is_main() and dist_utils.world_size() == 1 and dist_utils.rank() == 0
    assert not dist_utils.is_distributed()
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(dist_utils.reduce_sum(t), t)
    assert dist_utils.all_gather_object({"a": 1}) == [{"a": 1}] and dist_utils.broadcast_object(3) == 3
    model = torch.nn.Linear(2, 2)
    assert dist_utils.wrap_model(model, "fsdp") is model and dist_utils.wrap_model(model, "ddp") is model
    assert not dist_utils.is_fsdp(model)
    state = dist_utils.gather_full_state_dict(model)
    assert set(state) == {"weight", "bias"}
    with dist_utils.no_sync(model, skip=True):
        pass
    dist_utils.barrier()
    dist_utils.shutdown()
    assert dist_utils.resolve_device("cpu") == torch.device("cpu")
    for bad in ("tpu", "cuda:x"):
        with pytest.raises(SelfReplayError) as e:
            dist_utils.resolve_device(bad)
        one_line_error(e, "device")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(SelfReplayError) as e:
        dist_utils.env_world()
    one_line_error(e, "WORLD_SIZE")
