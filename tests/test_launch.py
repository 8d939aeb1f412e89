"""`python -m companion pipeline run`: notebook 3.4's parameters under a profile; the
single-process loop does exactly what it did before torchrun support (the notebooks'
printed numbers depend on it); mid-run checkpoints resume in one process too."""

import math

import pytest
import torch

from companion.launch import pipeline_parameters
from companion.pipeline import config_from_parameters
from companion.train import Checkpointing, TrainConfig, param_groups, train, warmup_cosine


def test_the_gpu_profile_gives_llava_15s_stages_and_the_notebooks_run_folder():
    params, run_dir = pipeline_parameters("gpu")
    config = config_from_parameters(params)
    stage1, stage2 = config.stage("stage1"), config.stage("stage2")
    assert (stage1.lr, stage1.batch_size, stage2.lr, stage2.batch_size) == (1e-3, 256, 2e-5, 128)
    assert params["device"] == "cuda" and run_dir.name == "pipeline"
    assert pipeline_parameters("smoke", {"stage2_lr": 0.5})[0]["stage2_lr"] == 0.5
    with pytest.raises(ValueError, match="declares no such parameter"):
        pipeline_parameters("smoke", {"stage9_lr": 1.0})


def test_the_command_reports_a_bad_parameter(capsys):
    from companion.__main__ import main

    assert main(["pipeline", "run", "--profile", "smoke", "-p", "stage9_lr=1"]) == 2
    assert "stage9_lr" in capsys.readouterr().err


def _toy(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Dropout(0.3), torch.nn.LayerNorm(7),
                              torch.nn.Linear(7, 2))
    data = torch.Generator().manual_seed(0)  # the same data whatever the initial weights
    x, y = torch.randn(40, 5, generator=data), torch.randn(40, 2, generator=data)

    def loss_fn(batch):
        loss = ((net(batch[0]) - batch[1]) ** 2).mean()
        return loss, {"scaled": loss.detach() * 3}

    def next_batch(index):
        rows = slice(index % 5 * 8, (index % 5 + 1) * 8)
        return x[rows], y[rows]

    return net, loss_fn, next_batch


CONFIG = TrainConfig(steps=7, lr=1e-2, weight_decay=0.1, accumulation=3, log_every=0,
                     grad_clip=0.5)


def _reference_loop(net, loss_fn, next_batch, config, lr_scale):
    """The loop as it was before torchrun support, written out: the same float operations
    in the same order (micro-batch losses / accumulation, clip, AdamW, warmup + cosine)."""
    params = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(params, config.weight_decay, lr_scale, config.lr),
                                  lr=config.lr, betas=config.betas, foreach=True)
    warmup = round(config.warmup_fraction * config.steps)
    losses = []
    net.train()
    for step in range(config.steps):
        factor = warmup_cosine(step, config.steps, warmup, config.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * group["lr_scale"] * factor
        total = 0.0
        for micro in range(config.accumulation):
            loss, _ = loss_fn(next_batch(step * config.accumulation + micro))
            (loss.float() / config.accumulation).backward()
            total += loss.item() / config.accumulation
        torch.nn.utils.clip_grad_norm_([p for _, p in params], config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


def test_one_process_trains_bit_for_bit_as_before():
    net, loss_fn, next_batch = _toy()
    history = train(net, loss_fn, next_batch, CONFIG, lr_scale={"0.": 0.5})
    reference, ref_loss_fn, ref_next_batch = _toy()
    losses = _reference_loop(reference, ref_loss_fn, ref_next_batch, CONFIG, {"0.": 0.5})
    assert [r["loss"] for r in history.steps] == losses  # exactly, not approximately
    for (name, a), b in zip(net.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_killed_run_resumes_from_its_checkpoint_to_the_same_weights(tmp_path):
    net, loss_fn, next_batch = _toy()
    whole = train(net, loss_fn, next_batch, CONFIG, checkpoint=Checkpointing(tmp_path / "a.pt", 2))

    class Killed(Exception):
        pass

    def kill(step):
        if step + 1 == 5:
            raise Killed

    killed, loss_fn2, next_batch2 = _toy()
    with pytest.raises(Killed):
        train(killed, loss_fn2, next_batch2, CONFIG, after_step=kill,
              checkpoint=Checkpointing(tmp_path / "b.pt", 2))
    assert torch.load(tmp_path / "b.pt", weights_only=False)["step"] == 4
    resumed, loss_fn3, next_batch3 = _toy(seed=1)  # other initial weights: the checkpoint's win
    again = train(resumed, loss_fn3, next_batch3, CONFIG,
                  checkpoint=Checkpointing(tmp_path / "b.pt", 2))
    # dropout draws continue from the checkpoint's RNG state, so every loss is the same
    assert [r["loss"] for r in again.steps] == [r["loss"] for r in whole.steps]
    for (name, a), b in zip(net.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="other settings"):
        train(resumed, loss_fn3, next_batch3, TrainConfig(steps=9, log_every=0),
              checkpoint=Checkpointing(tmp_path / "b.pt", 2))
    assert math.isfinite(again.last("loss"))
