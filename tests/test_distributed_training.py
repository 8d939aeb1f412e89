"""The shared training loop on 2 gloo processes equals one process on the same global batch;
only rank 0 writes; a run killed mid-stage resumes from its last checkpoint to the same
weights; the contrastive pre-training's first loss is the single-process loss.

Each scenario is a set of processes started with ``torch.multiprocessing`` (spawn), each
one building the same tiny model and data from seeds, so nothing is sent between them but
what torch.distributed sends. A hung collective fails the test after TIMEOUT seconds.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

WORLD = 2
STEPS, BATCH, EVERY, KILL_AT = 6, 4, 2, 5   # the killed run dies in step 5, after checkpoint 4
TIMEOUT = 120


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _smoke_stage():
    """A tiny VLM and stage-2 data (every task type), the same in every process."""
    from companion.instruction import encode_stage_data
    from companion.models import TinyClipConfig, build_clip
    from companion.tokenizer import train_tokenizer, world_corpus
    from companion.llava import image_seq_length
    from companion.lm import TinyLMConfig, build_lm
    from companion.vlm import build_vlm
    from companion.world import make_instruction_dataset, make_scenes

    tokenizer = train_tokenizer(world_corpus(40, seed=1), vocab_size=400)
    clip, processor, _ = build_clip(tokenizer, seed=0, sizes=TinyClipConfig(
        image_size=16, patch_size=8, vision_width=32, vision_layers=1, text_width=32,
        text_layers=1, heads=2, projection_dim=16))
    lm, _ = build_lm(tokenizer, seed=0, sizes=TinyLMConfig(hidden_size=32, layers=1, heads=2,
                                                            intermediate_size=64))
    model = build_vlm(clip, lm, tokenizer, seed=0)
    scenes = make_scenes(6, seed=0)
    records = make_instruction_dataset(scenes, seed=0)
    data = encode_stage_data(records, {s.scene_id: s for s in scenes}, tokenizer, processor,
                             image_seq_length(model), 16)["stage2"]
    return model, data, tokenizer


def _run_stage(folder: Path, after_step=None):
    """Stage 2 of the smoke stage with a checkpoint every EVERY steps; ``(history, weights)``."""
    from companion.instruction import train_stage
    from companion.train import Checkpointing

    model, data, tokenizer = _smoke_stage()
    if after_step is not None:  # the test's kill switch, run after each optimiser step
        import companion.instruction as instruction_module  # train_stage calls its `train`

        real = instruction_module.train
        instruction_module.train = lambda *a, **k: real(*a, **{**k, "after_step": after_step})
    history = train_stage(model, "stage2", data, STEPS, 2e-3, BATCH, 0, tokenizer.pad_token_id,
                          "cpu", log=None, checkpoint=Checkpointing(folder / "ckpt.pt", EVERY))
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return history.steps, weights


def _writes_under(folder: Path) -> list:
    """Start recording every file or folder this process writes, renames, makes or removes
    under ``folder``: Python's audit events, plus ``torch.save`` (its C++ writer opens the
    file itself)."""
    written = []

    def inside(path):
        return str(path).startswith(str(folder))

    def hook(event, args):
        if event == "open" and isinstance(args[0], (str, Path)) and inside(args[0]):
            mode, flags = args[1], args[2]
            if (mode and any(c in mode for c in "wax+")) or flags & (os.O_WRONLY | os.O_RDWR):
                written.append(str(args[0]))
        elif event in ("os.rename", "os.mkdir", "os.remove", "shutil.rmtree") and args and (
                isinstance(args[0], (str, Path)) and inside(args[0])):
            written.append(str(args[0]))

    sys.addaudithook(hook)
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, Path)) and inside(f):
            written.append(str(f))
        return real_save(obj, f, *args, **kwargs)

    torch.save = save
    return written


def _worker(rank: int, port: int, job: str, folder: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    folder = Path(folder)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        if job == "clip":
            from companion.clip import ClipRecipe, pretrain_clip
            from companion.tokenizer import train_tokenizer, world_corpus

            tokenizer = train_tokenizer(world_corpus(40, seed=1), vocab_size=400)
            run = pretrain_clip(ClipRecipe(train_scenes=16, batch_size=8, steps=2, image_size=16),
                                tokenizer=tokenizer, log_every=0)
            torch.save((run.history.steps, run.model.state_dict()), folder / f"clip{rank}.pt")
            return
        written = _writes_under(folder / "run")

        def kill(step):
            if job == "killed" and step + 1 == KILL_AT:
                os._exit(17)  # as abrupt as a kill: no cleanup, no more checkpoints

        steps, weights = _run_stage(folder / "run", kill if job == "killed" else None)
        torch.save({"steps": steps, "weights": weights, "written": list(written)},
                   folder / f"{job}{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _launch(job: str, folder: Path, expect_exit: int | None = None) -> None:
    """Run ``job`` on WORLD gloo processes; fail on a hang or an unexpected exit code."""
    context = mp.get_context("spawn")
    port = _free_port()
    procs = [context.Process(target=_worker, args=(rank, port, job, str(folder)))
             for rank in range(WORLD)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(TIMEOUT)
    hung = [p for p in procs if p.is_alive()]
    for proc in hung:
        proc.kill()
    assert not hung, f"{job}: {len(hung)} process(es) hung for {TIMEOUT} s"
    codes = [p.exitcode for p in procs]
    if expect_exit is None:
        assert codes == [0] * WORLD, f"{job}: exit codes {codes}"
    else:
        assert expect_exit in codes, f"{job}: exit codes {codes}, expected {expect_exit}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process on the whole batch, 2 ranks uninterrupted, 2 ranks killed then resumed."""
    single_dir = tmp_path_factory.mktemp("single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _run_stage(single_dir / "run")
    finally:
        torch.set_num_threads(threads)
    full = tmp_path_factory.mktemp("full")
    _launch("full", full)
    resumed = tmp_path_factory.mktemp("resumed")
    _launch("killed", resumed, expect_exit=17)
    killed_checkpoint = torch.load(resumed / "run" / "ckpt.pt", weights_only=False)["step"]
    _launch("resume", resumed)

    def load(path):
        return torch.load(path, weights_only=False)

    return {"single": single, "full": [load(full / f"full{r}.pt") for r in range(WORLD)],
            "resume": [load(resumed / f"resume{r}.pt") for r in range(WORLD)],
            "killed_checkpoint": killed_checkpoint}


@pytest.mark.distributed
def test_two_ranks_match_one_process_on_the_same_global_batch(runs):
    single_steps, single_weights = runs["single"]
    for result in runs["full"]:  # every rank ends with the same history and weights
        losses = [r["loss"] for r in result["steps"]]
        assert losses == pytest.approx([r["loss"] for r in single_steps], rel=1e-5, abs=1e-6)
        assert len(losses) == STEPS and losses[0] != losses[-1]
        for name, weight in single_weights.items():
            torch.testing.assert_close(result["weights"][name], weight, rtol=1e-4, atol=1e-5)
    # the LM and the projector learned (the comparison is not between two untrained models)
    model, _, _ = _smoke_stage()
    start = dict(model.named_parameters())
    assert not all(torch.equal(start[n].detach(), w) for n, w in single_weights.items())


@pytest.mark.distributed
def test_only_rank_0_writes_checkpoints(runs):
    rank0, rank1 = runs["full"]
    assert rank0["written"] and all("ckpt.pt" in p or p.endswith("run")
                                    for p in rank0["written"]), rank0["written"]
    assert rank1["written"] == []


@pytest.mark.distributed
def test_a_run_killed_mid_stage_resumes_to_the_uninterrupted_weights(runs):
    assert runs["killed_checkpoint"] == KILL_AT - 1  # it died after the step-4 checkpoint
    for full, resumed in zip(runs["full"], runs["resume"]):
        assert [r["loss"] for r in resumed["steps"]] == [r["loss"] for r in full["steps"]]
        for name, weight in full["weights"].items():
            assert torch.equal(resumed["weights"][name], weight), name


@pytest.mark.distributed
def test_contrastive_pretraining_on_two_ranks_has_the_single_process_first_loss(tmp_path):
    from companion.clip import ClipRecipe, pretrain_clip
    from companion.tokenizer import train_tokenizer, world_corpus

    _launch("clip", tmp_path)
    torch.set_num_threads(1)
    tokenizer = train_tokenizer(world_corpus(40, seed=1), vocab_size=400)
    single = pretrain_clip(ClipRecipe(train_scenes=16, batch_size=8, steps=2, image_size=16),
                           tokenizer=tokenizer, log_every=0)
    first = single.history.steps[0]
    for rank in range(WORLD):
        steps, weights = torch.load(tmp_path / f"clip{rank}.pt", weights_only=False)
        # step 1: each rank scores 4 images against the 8 gathered texts (and vice versa)
        assert steps[0]["loss"] == pytest.approx(first["loss"], rel=1e-6)
        assert steps[0]["grad_norm"] == pytest.approx(first["grad_norm"], rel=1e-4)
        assert steps[1]["loss"] == pytest.approx(single.history.steps[1]["loss"], rel=1e-5)
        for name, weight in single.model.state_dict().items():  # CLIPModel's unused
            if name.endswith("k_proj.bias"):  # logit_scale included; not the key biases:
                continue  # softmax ignores them, their gradient is rounding noise Adam amplifies
            # Adam scales each element's step to ~lr (3e-3), so a rounding-sized gradient can
            # move an element visibly: allow a tenth of one step
            torch.testing.assert_close(weights[name], weight, rtol=1e-3, atol=3e-4)
