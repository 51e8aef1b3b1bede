"""The DeepSpeed backend: its config, equality with the torch backend at every ZeRO stage, the
checkpoint round trip, the sharded reference policy, and `klbench run trainer=deepspeed`.

In-process tests use a tiny Qwen2 built in code on CUDA when there is one, else on CPU; DeepSpeed
joins a one-process group the first time (it stays for the session). The first DeepSpeed start in
a fresh environment JIT-builds its shared-memory comm op on CPU (~30-55 s on 2 cores; cached under
~/.cache/torch_extensions, ~1 s after that).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from klbench.config import ConfigError, DeepSpeedConfig, TrainerConfig
from klbench.errors import KlbenchError
from klbench.train.backends import TorchBackend
from klbench.train.ds_backend import DeepSpeedBackend, ds_config
from klbench.train.runstate import Dist

pytestmark = pytest.mark.deepspeed

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
#: ZeRO-3 leaves parameters below this many elements unpartitioned (DeepSpeed's default is 1e5,
#: more than any tensor of the tiny models), so tests set 0 to really shard every parameter.
SHARD_ALL = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
SMALL = ["logger=none", "algo.prompts_per_step=4", "algo.group_size=4", "trainer.threads=1"]


@pytest.fixture(autouse=True)
def single_process_env(monkeypatch):
    """What DeepSpeed's single-process defaults set, undone after each test (the group stays)."""
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.setenv(key, "1" if key == "WORLD_SIZE" else "0")
    monkeypatch.setenv("DS_ACCELERATOR", DEVICE.type)  # read once, when DeepSpeed first picks one


def tiny_model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(cfg).to(DEVICE, dtype).train()


def trainer_cfg(stage: int, **ds) -> TrainerConfig:
    # clipping active (grad norms ~1.4 > 0.5) and a warm-up, so both show up in the comparison
    return TrainerConfig(
        backend="deepspeed",
        lr=1e-2,
        grad_clip=0.5,
        warmup_steps=3,
        lr_schedule="cosine",
        steps=6,
        deepspeed=DeepSpeedConfig(zero_stage=stage, **ds),
    )


def batches(n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (4, 12), generator=gen).to(DEVICE) for _ in range(n)]


def full_params(backend) -> dict[str, torch.Tensor]:
    with backend.full_weights() as module:
        return {k: v.detach().float().cpu().clone() for k, v in module.named_parameters()}


def rl_steps(
    backend, data: list[torch.Tensor], steps: int, minis: int = 2
) -> tuple[list[float], list[float]]:
    """`steps` RL steps of `minis` optimizer steps each; the grad norms and the LR after each."""
    norms, lrs = [], []
    for s in range(steps):
        for x in data[s * minis : (s + 1) * minis]:
            norms.append(float(backend.step(backend.model(input_ids=x, labels=x).loss)))  # torch: a tensor
        backend.end_of_step()
        lrs.append(backend.lr)
    return norms, lrs


# -- the generated DeepSpeed config ----------------------------------------------------------------
def test_ds_config_maps_trainer_settings():
    cfg = TrainerConfig(
        grad_clip=0.7,
        deepspeed=DeepSpeedConfig(zero_stage=3, offload_optimizer=True, offload_params=True, extra=SHARD_ALL),
    )
    c = ds_config(cfg, dtype=torch.bfloat16, device=torch.device("cuda"), world=4, micro_batch_size=8)
    assert (c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"], c["train_batch_size"]) == (
        8,
        1,
        32,
    )
    assert c["gradient_clipping"] == 0.7 and c["bf16"]["enabled"] and not c["fp16"]["enabled"]
    zero = c["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_param_persistence_threshold"] == 0  # `extra` merged in
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}

    c = ds_config(TrainerConfig(), dtype=torch.float32, device=torch.device("cpu"), world=1)
    assert not c["bf16"]["enabled"] and c["zero_optimization"] == {"stage": 2}
    assert c["train_batch_size"] == c["train_micro_batch_size_per_gpu"] == 1
    with pytest.raises(KlbenchError, match="float16"):
        ds_config(TrainerConfig(), dtype=torch.float16, device=torch.device("cuda"), world=1)


def test_deepspeed_config_validation():
    with pytest.raises(ConfigError, match="offload_params"):
        DeepSpeedConfig(zero_stage=2, offload_params=True)
    with pytest.raises(ConfigError, match="offload_optimizer"):
        DeepSpeedConfig(zero_stage=0, offload_optimizer=True)
    with pytest.raises(ConfigError, match="zero_stage"):
        DeepSpeedConfig(zero_stage=4)


# -- the engine against the torch backend ----------------------------------------------------------
@pytest.mark.parametrize(
    ("stage", "offload"),
    [
        (0, {}),
        (1, {}),
        (2, {}),
        (3, {}),
        (2, {"offload_optimizer": True}),
        (3, {"offload_optimizer": True, "offload_params": True}),
    ],
    ids=["zero0", "zero1", "zero2", "zero3", "zero2-offload", "zero3-offload"],
)
def test_each_zero_stage_trains_like_the_torch_backend(stage, offload):
    """Two RL steps of two optimizer steps each: same grad norms, LR schedule and parameters
    (with the optimizer state / parameters offloaded to CPU memory too; on CPU that is a copy).

    Exact in real arithmetic; in float32 clipping rounds differently (ZeRO divides by a combined
    scale, torch multiplies), which AdamW's normalisation amplifies for tiny gradients: parameters
    agree to 1e-4 while every step moves them by up to lr = 1e-2.
    """
    start = tiny_model()
    ds = DeepSpeedBackend(
        trainer_cfg(stage, extra=SHARD_ALL, **offload), copy.deepcopy(start), Dist(), micro_batch_size=4
    )
    ref = TorchBackend(trainer_cfg(stage), copy.deepcopy(start), Dist())
    assert ds.lr == ref.lr == pytest.approx(1e-2 / 3)  # warm-up step 0
    if stage == 3:
        assert all(p.numel() == 0 for p in ds.module.parameters()), "ZeRO-3 left parameters unpartitioned"
    data = batches(4)
    ds_norms, ds_lrs = rl_steps(ds, data, steps=2)
    ref_norms, ref_lrs = rl_steps(ref, data, steps=2)

    assert ds_norms == pytest.approx(ref_norms, rel=1e-5)
    assert max(ref_norms) > 0.5  # clipping was active
    assert ds_lrs == ref_lrs  # one schedule step per RL step, not per optimizer step
    got, want = full_params(ds), full_params(ref)
    initial = {k: v.detach().float().cpu() for k, v in start.named_parameters()}
    moved = max((want[k] - initial[k]).abs().max().item() for k in want)
    assert moved > 5e-3, "parameters did not move"
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    assert worst < 1e-4, f"stage {stage}: parameters differ from the torch backend's by {worst:.2e}"


def test_zero3_full_weights_and_sharded_reference():
    cfg = trainer_cfg(3, extra=SHARD_ALL)
    policy = tiny_model()
    plain_ref = copy.deepcopy(policy).eval().requires_grad_(False)
    ds = DeepSpeedBackend(cfg, policy, Dist())
    ref = ds.prepare_reference(copy.deepcopy(plain_ref))
    assert all(p.numel() == 0 for p in ref.parameters()), "the reference was not sharded"
    x = batches(1)[0]
    with torch.no_grad():
        assert torch.allclose(ref(input_ids=x).logits, plain_ref(input_ids=x).logits, atol=1e-6)
    with ds.full_weights() as module:
        shapes = {k: tuple(p.shape) for k, p in module.named_parameters()}
        with torch.no_grad():  # plain forwards through the module, as the HF rollout engine makes
            for _ in range(3):
                module(input_ids=x[:, :5])
    assert shapes == {k: tuple(p.shape) for k, p in plain_ref.named_parameters()}
    assert all(p.numel() == 0 for p in ds.module.parameters()), "weights stayed gathered after the context"


@pytest.mark.skipif(DEVICE.type != "cuda", reason="bf16 DeepSpeed training is checked on a GPU")
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_bf16_model_trains_with_fp32_master_weights(stage):
    ds = DeepSpeedBackend(trainer_cfg(stage, extra=SHARD_ALL), tiny_model(torch.bfloat16), Dist())
    assert ds.engine.bfloat16_enabled() and ds.config["bf16"]["enabled"]
    before = full_params(ds)
    data = batches(4)
    losses = [ds.model(input_ids=data[0], labels=data[0]).loss.item()]
    norms, _ = rl_steps(ds, data, steps=2)
    losses.append(ds.model(input_ids=data[0], labels=data[0]).loss.item())
    after = full_params(ds)
    assert all(0 < n < float("inf") for n in norms)
    assert losses[1] < losses[0]
    assert max((after[k] - before[k]).abs().max().item() for k in after) > 1e-3


# -- checkpoints -------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", [2, 3])
def test_save_then_load_continues_exactly(stage, tmp_path):
    """save(dir) / load(dir): weights, optimizer shards and the LR schedule all come back."""
    cfg = trainer_cfg(stage, extra=SHARD_ALL)
    start, data = tiny_model(), batches(8)
    a = DeepSpeedBackend(cfg, copy.deepcopy(start), Dist())
    rl_steps(a, data[:4], steps=2)
    written = a.save(tmp_path)
    assert written == tmp_path / "deepspeed" and written.is_dir()
    a_norms, a_lrs = rl_steps(a, data[4:], steps=2)

    b = DeepSpeedBackend(cfg, copy.deepcopy(start), Dist())
    b.load(tmp_path)
    b_norms, b_lrs = rl_steps(b, data[4:], steps=2)
    assert (b_norms, b_lrs) == (a_norms, a_lrs)
    got, want = full_params(b), full_params(a)
    assert all(torch.equal(got[k], want[k]) for k in want)

    with pytest.raises(KlbenchError, match="no DeepSpeed checkpoint"):
        b.load(tmp_path / "elsewhere")
    with pytest.raises(KlbenchError, match="trainer.backend=torch"):
        b.load_state_dict({"optimizer": {}, "scheduler": {}})


# -- the CLI ------------------------------------------------------------------------------------------
def final_weights(run_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


def final_weights_of(model_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


@pytest.mark.slow
def test_cli_deepspeed_run_trains(run_cli, miniature_dir, tmp_path):
    run_dir = tmp_path / "ds"
    run_cli("run", "trainer=deepspeed", "trainer.steps=10", *SMALL, f"hydra.run.dir={run_dir}")
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "completed" and status["step"] == 10
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert all(r["optim/lr"] == 1e-4 for r in rows)
    # a step whose groups all have equal rewards, with the KL term still 0 (step 1), has no gradient at all
    # (this machine: step 1); every other step has one
    assert all(r["loss/grad_norm"] > 0 for r in rows if r["loss/pg"] != 0 or r["loss/kl"] != 0)
    assert sum(r["loss/grad_norm"] > 0 for r in rows) >= 8
    start, final = final_weights_of(miniature_dir), final_weights(run_dir)
    assert set(final) == set(start)
    assert max((final[k] - start[k]).abs().max().item() for k in final) > 1e-5, "parameters did not change"


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_cli_zero_stages_run_and_save_full_weights(stage, run_cli, miniature_dir, tmp_path):
    """Two steps per stage; ZeRO-3 with every parameter sharded must still save whole weights."""
    run_dir = tmp_path / f"zero{stage}"
    extra = (
        ["+trainer.deepspeed.extra.zero_optimization.stage3_param_persistence_threshold=0"]
        if stage == 3
        else []
    )
    run_cli(
        "run",
        "trainer=deepspeed",
        f"trainer.deepspeed.zero_stage={stage}",
        *extra,
        "trainer.steps=2",
        *SMALL,
        f"hydra.run.dir={run_dir}",
    )
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    start, final = final_weights_of(miniature_dir), final_weights(run_dir)
    assert {k: v.shape for k, v in final.items()} == {k: v.shape for k, v in start.items()}
    assert max((final[k] - start[k]).abs().max().item() for k in final) > 1e-6, "parameters did not change"
