# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 3.4 The whole LLaVA-1.5 pipeline, and the four training tricks (完整训练流程)
#
# The earlier sections trained each paradigm on its own. Here they become one chain, the
# way LLaVA-1.5 is built. The seed's figure has two LLaVA stages:
#
# - **stage 1, pre-training (feature alignment)**: 558K image-caption pairs; only the MLP
#   projector learns; CLIP ViT-L and Vicuna-7B are frozen; batch 256, one epoch;
# - **stage 2, instruction tuning**: 665K mixed instructions (LLaVA-Instruct, VQA, OCR);
#   projector and the whole LLM learn; CLIP stays frozen; batch 128, one epoch.
#
# LLaVA starts from a CLIP and an LLM that someone else pre-trained. We have neither, so our
# chain starts two stages earlier and ends one stage later:
#
# | stage | what it is here | section |
# |---|---|---|
# | vision | CLIP trained with InfoNCE on image-caption pairs | 3.1.1 |
# | lm | a small Llama trained on the world's text alone: our "pretrained LLM" | 3.2 |
# | stage 1 | projector only, on description records | 3.2 |
# | stage 2 | projector + LM, on all six task types | 3.2 |
# | dpo | preference alignment on judge-labelled pairs | 3.3.3 |
#
# One table in `companion.pipeline` declares every stage (data, trainable parts, learning
# rate, batch size, epochs, warmup), and `run_pipeline` runs it. Each stage's result is an
# artifact keyed by its settings **and those of every stage before it**: a rerun loads
# finished stages, a stage killed mid-way leaves nothing half-written behind, and changing
# one row rebuilds that stage and the ones after it, never the ones before. That last
# property makes the second half of this notebook cheap: each of the seed's four training
# tricks is an experiment "the same pipeline with one row changed".

# %% tags=["parameters"]
seed = 0  # random seed for data, initialisation and batches
device = "auto"  # "auto" picks cuda, then mps, then cpu; or name one
threads = 2  # CPU threads for torch (fixed so the printed numbers are reproducible)
output_dir = "../build/interactive"  # the runner sets it;
#   metrics go to output_dir/metrics/3.4.json
cache_dir = "../.cache"  # the pipeline's run folder is cache_dir/pipeline (a rerun resumes there)
tokenizer_scenes = 2000  # scenes whose text trains the world's BPE
clip_scenes = 4000  # image-caption pairs of the vision stage
lm_scenes = 3000  # scenes whose text-only conversations pretrain the LM
sft_scenes = 3000  # scenes of the instruction data (one record of each task type per scene)
preference_scenes = 200  # scenes whose prompts the DPO stage samples and labels
test_scenes = 60  # held-out scenes for every evaluation
vision_lr = 3e-3  # vision stage: peak learning rate
vision_batch_size = 64  # vision stage: image-caption pairs per batch
vision_epochs = 8.0  # vision stage: passes over the pairs
lm_lr = 3e-3  # lm stage: peak learning rate
lm_batch_size = 32  # lm stage: conversations per batch
lm_epochs = 3.2  # lm stage: passes over the text
stage1_lr = 1e-3  # stage 1: peak learning rate (LLaVA-1.5: 1e-3)
stage1_batch_size = 16  # stage 1: batch size (LLaVA-1.5: 256)
stage1_epochs = 1.0  # stage 1: passes over the description records (LLaVA-1.5: 1)
stage2_lr = 2e-3  # stage 2: peak learning rate
#   (LLaVA-1.5: 2e-5 for a 7B LM; a tiny LM takes more)
stage2_batch_size = 16  # stage 2: batch size (LLaVA-1.5: 128)
stage2_epochs = 0.5  # stage 2: passes over the instruction records (LLaVA-1.5: 1)
dpo_lr = 3e-5  # DPO stage: peak learning rate
dpo_batch_size = 16  # DPO stage: preference pairs per batch
dpo_epochs = 1.0  # DPO stage: passes over the preference pairs
dpo_beta = 0.1  # DPO stage: strength of the pull towards the stage-2 model
warmup_fraction = 0.03  # warmup of the LLaVA stages, as a fraction of their steps
#   (LLaVA-1.5: 3%)
run_tricks = True  # run the four training-trick experiments after the pipeline
vision_lr_scales = [0.1, 1.0]  # trick 2: vision learning rate as a multiple of stage 2's
#   (frozen is the control)
dropped_task = "counting"  # trick 3: the task type left out of stage 2's mix
clean_fraction = 0.25  # trick 4: the small clean set keeps this fraction of the scenes
noisy_fraction = 0.5  # trick 4: the large set shows the wrong image in this fraction of records
retrieval_scenes = 300  # held-out scenes for CLIP retrieval with a tuned vision tower (trick 2)
max_new_tokens = 48  # longest generated answer, in tokens
clip_checkpoint = ""  # a CLIP checkpoint (hub id or folder) as the vision stage:
#   loaded, not trained
lm_checkpoint = ""  # a causal LM checkpoint (with its tokenizer) as the lm stage:
#   loaded, not trained

# %% [markdown]
# ## Setup: the stage table
#
# The notebook's parameters fill the table; the `gpu` profile in `book.toml` puts
# LLaVA-1.5's published stage-1 and stage-2 settings into the same rows.

# %%
import time

import matplotlib.pyplot as plt
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

from companion.book import write_metrics
from companion.clip import build_caption_data
from companion.evaluate import paired_difference, verdict
from companion.pipeline import (config_from_parameters, evaluate_stage, run_pipeline,
                                stage_records, stage_table)
from companion.plots import plot_curves, plot_task_accuracy
from companion.rlhf import versus_reference_model
from companion.runtime import setup
from companion.tricks import compare_arm, vision_alignment, vision_drift
from companion.vlm import load_vlm
from companion.world import TASK_TYPES, make_instruction_dataset, make_scenes

# %matplotlib inline
dev = setup(seed=seed, device=device, threads=threads)
metrics = {}
config = config_from_parameters(globals())
run_dir = f"{cache_dir}/pipeline"
print(stage_table(config))  # LLaVA-1.5's published settings beside the two LLaVA stages

# %% [markdown]
# ## The chain, run as one
#
# `run_pipeline` trains each stage in order and saves it. Every stage reuses the code of its
# section: `pretrain_clip` (3.1.1), `pretrain_lm` and `train_stage` (3.2), `train_dpo`
# (3.3.3).

# %% tags=["nbval-ignore-output"]
# each stage says "trained" on a first run and "loaded" when its artifact is already there
start = time.perf_counter()
result = run_pipeline(config, run_dir, device=dev)
pipeline_seconds = time.perf_counter() - start
metrics["pipeline"] = {s.name: {"steps": s.steps, "examples": s.examples} for s in result.stages}

# %% tags=["nbval-ignore-output"]
# wall times vary from machine to machine (and the second run of this notebook loads every stage)
print(f"whole chain: {pipeline_seconds:.0f} s; per stage: "
      + ", ".join(f"{s.name} {s.seconds:.0f} s" for s in result.stages))

# %% [markdown]
# Run it again: nothing is retrained. Every stage's folder holds a manifest with the
# checksum of each file; a stage is loaded only if all of them match, so a half-written or
# corrupted stage is rebuilt instead (the tests kill a run mid-stage and corrupt a weight
# file to prove it).

# %%
start = time.perf_counter()
again = run_pipeline(config, run_dir, device=dev, log=None)
print("rerun:",
      ", ".join(f"{s.name} {'loaded' if not s.built else 'TRAINED'}" for s in again.stages),
      f"in {time.perf_counter() - start:.1f} s")
print("stage folders:", [s.folder.name for s in again.stages])

# %% [markdown]
# ## What each stage learned
#
# The training curves of the five stages, then the three LLaVA stages judged by the world's
# judge on held-out scenes, per task type.

# %%
fig, axes = plt.subplots(1, 5, figsize=(17, 3.2))
for ax, stage in zip(axes, result.stages):
    plot_curves({stage.name: stage.curve("loss")},
                f"{stage.name}: {' + '.join(config.stage(stage.name).trains)}", ylabel="loss",
                ax=ax, smooth=10)
plt.show()

# %% tags=["trained-figures"]
test_scene_list = make_scenes(test_scenes, seed=seed + 3, start_id=40_000_000)
test_by_id = {s.scene_id: s for s in test_scene_list}
test_records = make_instruction_dataset(test_scene_list, seed=seed + 3)
scores = {name: evaluate_stage(result.folder(name), test_records, test_by_id, device=dev,
                               max_new_tokens=max_new_tokens)
          for name in ("stage1", "stage2", "dpo")}
print(f"{len(test_records)} held-out records, {len(scores['stage2'].answers)} judged answers")
print(f"{'after':>8} {'mean task accuracy':>19} {'hallucination rate':>19}")
for name, s in scores.items():
    metrics[name] = {"mean_task_accuracy": s.mean_task_accuracy(),
                     "hallucination_rate": s.hallucination_rate(),
                     "by_task": {t: row["accuracy"] for t, row in s.by_task().items()}}
    print(f"{name:>8} {s.mean_task_accuracy():>19.3f} {s.hallucination_rate():>19.3f}")
dpo_change = versus_reference_model({"stage2": scores["stage2"], "dpo": scores["dpo"]},
                                    base="stage2")["dpo"]  # answer by answer, as in 3.3
metrics["dpo_versus_stage2"] = dpo_change
print(f"DPO against stage 2, paired: hallucination {dpo_change['hallucination_change']:+.3f} "
      f"± {dpo_change['hallucination_se']:.3f}, task accuracy {dpo_change['accuracy_change']:+.3f} "
      f"± {dpo_change['accuracy_se']:.3f} -> {dpo_change['verdict']}")
fig = plot_task_accuracy({name: s.by_task() for name, s in scores.items()},
                         "The pipeline's LLaVA stages, per task type")
plt.show()

# %% [markdown]
# With the default parameters these figures are lower than 3.2's: stage 2 here sees about
# a sixth of the examples 3.2's stage 2 sees (the step counts are printed above), so that
# the whole chain fits in a few minutes and leaves time for the experiments. The DPO stage
# trains on only a couple of thousand pairs at a small learning rate; 3.3.3 measured what
# DPO does at its own scale.
#
# ## The four training tricks
#
# The seed ends with four tricks:
#
# 1. **progressive unfreezing**: train the connector first, then unfreeze the LLM;
# 2. **learning rates**: give the vision encoder a small learning rate, or freeze it;
# 3. **data mixing**: mix several task types to generalise;
# 4. **quality first**: a small high-quality set beats a large low-quality one.
#
# Each experiment below is the pipeline's own stage 2 (the **control**) against the same
# chain with one row changed. Both are judged on the same held-out answers, so the
# difference is *paired*: we report it with its standard error and call it an effect only
# beyond two standard errors. The stages before the change load from the run folder.

# %% tags=["trained-figures"]
control = scores["stage2"]
s1, s2 = result.stage("stage1"), result.stage("stage2")
stage2 = config.stage("stage2")
trick_scores, trick_rows, trick_runs = {}, [], {}


def run_arm(name, arm_config):
    """Run the changed chain up to stage 2 and judge its stage-2 model."""
    start = time.perf_counter()
    arm = run_pipeline(arm_config, run_dir, device=dev, log=None)
    trick_runs[name] = {"seconds": time.perf_counter() - start,
                        "rebuilt": [s.name for s in arm.stages if s.built]}
    trick_scores[name] = evaluate_stage(arm.folder("stage2"), test_records, test_by_id,
                                        device=dev, max_new_tokens=max_new_tokens)
    return arm


def compare(trick, name, note=""):
    """One row of the tricks table: the arm against the control, paired."""
    row, line = compare_arm(control, trick_scores[name], trick, name, note)
    trick_rows.append(row)
    print(line)
    return row


pipeline_upto_stage2 = config.upto("stage2")  # the arms stop at stage 2
print(f"control: stage 1 {s1.steps} steps, stage 2 {s2.steps} steps on {s2.examples} records; "
      f"answers correct {control.accuracy():.3f}, mean task accuracy "
      f"{control.mean_task_accuracy():.3f}")

# %% [markdown]
# ### Trick 1: progressive unfreezing
#
# The control aligns the projector alone first (stage 1) and only then unfreezes the LM.
# The arm skips stage 1: projector and LM learn together from the first step, while the
# projector is still random and feeds the LM noise. To be fair in compute, the arm's single
# stage takes as many steps as stage 1 and stage 2 together, on stage 2's data.

# %% tags=["trained-figures"]
if run_tricks:
    all_at_once = pipeline_upto_stage2.without_stage("stage1").with_stage(
        "stage2", epochs=(s1.steps + s2.steps) * stage2.batch_size / s2.examples)
    arm = run_arm("all at once", all_at_once)
    compare("progressive unfreezing", "all at once",
            f"{arm.stage('stage2').steps} steps, no stage 1")
    fig = plot_curves({"all at once (projector + LM from step 1)": arm.stage("stage2").curve(),
                       "progressive (stage 2, after stage 1)": s2.curve(step_offset=s1.steps)},
                      "Stage-2 loss: progressive against all at once",
                      xlabel="optimiser step (stage 1 + stage 2)", ax=None, smooth=20)
    plt.show()

# %% [markdown]
# LLaVA's reason for stage 1 is to protect a large pretrained LLM: while the projector is
# random, the gradients that reach the LLM come from noise, and a 7B model's knowledge is
# expensive to disturb. Our LM is tiny and learns at a high rate, so it may simply recover;
# the paired difference above says whether the order mattered at this scale.
#
# ### Trick 2: the vision encoder's learning rate
#
# LLaVA keeps CLIP frozen in both stages. The arms let the vision tower learn in stage 2 at
# a multiple of the rest's learning rate. Besides the answers we measure what the seed's
# advice protects: the vision tower's alignment with text. We put the tuned tower back into
# the CLIP it came from and measure held-out image→text retrieval (3.1.1's R@1), and how far
# its weights moved.

# %% tags=["nbval-ignore-output"]
if run_tricks:
    clip = CLIPModel.from_pretrained(result.folder("vision")).to(dev)  # with CLIP's own
    retrieval_data = build_caption_data(                                 # tokenizer and processor
        make_scenes(retrieval_scenes, seed=seed + 5, start_id=45_000_000),
        AutoTokenizer.from_pretrained(result.folder("vision")),
        AutoImageProcessor.from_pretrained(result.folder("vision")),
        render_size=clip.config.vision_config.image_size)
    frozen, _, _ = load_vlm(result.folder("stage2"), device=dev)
    alignment = {"frozen (control)": (vision_alignment(clip, frozen, retrieval_data)["i2t_R@1"],
                                      vision_drift(frozen, clip))}
    for scale in vision_lr_scales:
        name = f"vision at {scale:g}x lr"
        arm = run_arm(name, pipeline_upto_stage2.with_stage(
            "stage2", trains=("vision", "projector", "lm"), lr_scale=(("vision", scale),)))
        tuned, _, _ = load_vlm(arm.folder("stage2"), device=dev)
        alignment[name] = (vision_alignment(clip, tuned, retrieval_data)["i2t_R@1"],
                           vision_drift(tuned, clip))
        compare("vision learning rate", name, f"vision lr {scale * stage2.lr:.0e}")
    print(f"\n{'vision tower':>20} {'CLIP i2t R@1':>13} {'weight change':>14}")
    for name, (r1, drift) in alignment.items():
        print(f"{name:>20} {r1:>13.3f} {drift:>14.3f}")
    metrics["vision_alignment"] = {name: {"i2t_R@1": r1, "relative_weight_change": drift}
                                   for name, (r1, drift) in alignment.items()}

# %% [markdown]
# Read the two columns together. Instruction tuning's loss only asks the vision tower to
# help the LM answer; nothing in it keeps the tower's features aligned with CLIP's text
# tower. So the retrieval R@1 of the tuned tower (put back into its CLIP) measures how much
# of pre-training's alignment the stage spent, even when the answers barely change.
#
# ### Trick 3: data mixing
#
# Stage 2 mixes all six task types. The arm leaves one out (same epochs, so every remaining
# type is seen as often as in the control). Which answers suffer: only the dropped type's,
# or others too?

# %% tags=["nbval-ignore-output"]
if run_tricks:
    name = f"without {dropped_task}"
    run_arm(name, pipeline_upto_stage2.with_stage(
        "stage2", tasks=tuple(t for t in TASK_TYPES if t != dropped_task)))
    compare("data mixing", name, f"stage 2 without {dropped_task} records")
    control_table, arm_table = control.by_task(), trick_scores[name].by_task()
    print(f"\n{'task':>12} {'full mix':>9} {name:>20}")
    for task in control_table:
        print(f"{task:>12} {control_table[task]['accuracy']:>9.2f} "
              f"{arm_table[task]['accuracy']:>20.2f}")
    metrics["mixing_by_task"] = {task: {"full": control_table[task]["accuracy"],
                                        "dropped": arm_table[task]["accuracy"]}
                                 for task in control_table}
    fig = plot_task_accuracy({"full mix (control)": control_table, name: arm_table},
                             f"Data mixing: stage 2 with and without {dropped_task}")
    plt.show()

# %% [markdown]
# Task types share skills (counting objects is also part of reasoning and of multi-turn
# chats; reading a word needs the same attention to one spot in the image), so removing one
# type can move the others too: compare every row, not only the dropped one.
#
# ### Trick 4: quality over quantity
#
# Two ways to spend the same compute on stage 2: a **small clean** set (a fraction of the
# scenes, run for more epochs so it takes as many steps as the control), or a **large noisy**
# set (every scene, but a fraction of the records show another scene's image, like web
# alt-text written for a different photo: the answer is fluent and confidently wrong about
# the picture it is paired with).

# %% tags=["nbval-ignore-output"]
if run_tricks:
    clean = f"clean {clean_fraction:.0%} of scenes"
    noisy = f"all scenes, {noisy_fraction:.0%} wrong images"
    run_arm(clean, pipeline_upto_stage2.with_stage(
        "stage2", scene_fraction=clean_fraction, epochs=stage2.epochs / clean_fraction))
    noisy_config = pipeline_upto_stage2.with_stage("stage2", image_noise=noisy_fraction)
    run_arm(noisy, noisy_config)
    noisy_records = stage_records(noisy_config, noisy_config.stage("stage2"))[1]
    n_noisy = sum(bool(r.get("noisy")) for r in noisy_records)
    compare("quality over quantity", clean, "equal steps")
    compare("quality over quantity", noisy, f"{n_noisy} of {len(noisy_records)} records mismatched")
    head_to_head = paired_difference(trick_scores[noisy], trick_scores[clean])
    print(f"\nsmall clean against large noisy: answers correct "
          f"{head_to_head['control']:.3f} (noisy) -> {head_to_head['arm']:.3f} (clean), "
          f"{head_to_head['difference']:+.3f} ± {head_to_head['se']:.3f}: "
          f"{verdict(head_to_head['difference'], head_to_head['se'])} for the clean set")
    metrics["clean_minus_noisy"] = head_to_head

# %% [markdown]
# ## The tricks, measured
#
# One row per arm, each against the same control (the pipeline's stage 2). "Answers correct"
# pools every judged answer; the verdict needs a change beyond two standard errors of the
# paired difference.

# %% tags=["nbval-ignore-output"]
if run_tricks:
    print(f"{'trick':>24} {'arm':>28} {'correct':>8} {'change':>15} {'hallucinating':>14} "
          f"{'change':>15}  verdict")
    print(f"{'(control)':>24} {'pipeline stage 2':>28} {control.accuracy():>8.3f} "
          f"{'':>15} {control.hallucination_rate():>14.3f}")
    for row in trick_rows:
        print(f"{row['trick']:>24} {row['arm']:>28} {row['accuracy']:>8.3f} "
              f"{row['accuracy_change']:>+8.3f} ± {row['accuracy_se']:.3f} "
              f"{row['hallucination']:>14.3f} "
              f"{row['hallucination_change']:>+8.3f} ± {row['hallucination_se']:.3f}  "
              f"{row['verdict']}")
    metrics["tricks"] = trick_rows
    fig, ax = plt.subplots(figsize=(9, 3.4))
    labels = [row["arm"] for row in trick_rows]
    ax.barh(labels, [row["accuracy_change"] for row in trick_rows],
            xerr=[2 * row["accuracy_se"] for row in trick_rows], color="tab:blue", capsize=3)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("change in answers correct vs the pipeline's stage 2 (± 2 s.e.)")
    ax.set_title("The training tricks: each arm against the same control")
    fig.tight_layout()
    plt.show()

# %% [markdown]
# What the experiments say, computed from the table (one seed, one scale: a "no clear
# effect" here is a statement about this world and these sizes, not about LLaVA):

# %% tags=["nbval-ignore-output"]
if run_tricks:
    by_arm = {row["arm"]: row for row in trick_rows}
    for trick in dict.fromkeys(row["trick"] for row in trick_rows):
        arms = [row for row in trick_rows if row["trick"] == trick]
        print(f"{trick}: " + "; ".join(f"{row['arm']} {row['verdict']} "
                                        f"({row['accuracy_change']:+.3f} correct, "
                                        f"{row['hallucination_change']:+.3f} hallucinating)"
                                        for row in arms))
    r1 = {name: v[0] for name, v in alignment.items()}
    print("  the vision tower's CLIP retrieval R@1: " +
          ", ".join(f"{name} {value:.3f}" for name, value in r1.items()))
    changes = {task: v["dropped"] - v["full"] for task, v in metrics["mixing_by_task"].items()}
    worst = sorted(changes, key=changes.get)[:2]
    print(f"  dropping {dropped_task} moved {dropped_task} by {changes[dropped_task]:+.2f}; the "
          f"largest drops: " + ", ".join(f"{t} {changes[t]:+.2f}" for t in worst))
    print(f"  small clean against large noisy (same steps): "
          f"{metrics['clean_minus_noisy']['difference']:+.3f} ± "
          f"{metrics['clean_minus_noisy']['se']:.3f} answers correct in favour of the clean set")

# %% tags=["nbval-ignore-output"]
# which stages each arm rebuilt (the rest were loaded) and how long it took
for name, run in trick_runs.items():
    print(f"{name:>28}: rebuilt {run['rebuilt']} in {run['seconds']:.0f} s")

# %% tags=["trained-figures"]
write_metrics("3.4", metrics, output_dir)
print(f"stage 2 mean task accuracy {metrics['stage2']['mean_task_accuracy']:.3f}, after DPO "
      f"{metrics['dpo']['mean_task_accuracy']:.3f}; {len(trick_rows)} trick arms measured")
