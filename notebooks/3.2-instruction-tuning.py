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
# # 3.2 Instruction tuning: LLaVA data, assistant-only loss, two stages (指令微调)
#
# Pre-training gave us a vision encoder whose features line up with text (3.1.1). A useful
# assistant must do more: *follow an instruction* about an image ("how many circles?",
# "read the word", "where is the red square?") and answer in words. Instruction tuning
# teaches that by supervised training on conversations about images.
#
# This notebook builds a LLaVA-style model from three real `transformers` parts and trains
# it the way LLaVA does:
#
# - the **vision tower**: the CLIP image encoder trained in 3.1.1 (frozen throughout);
# - the **projector**: LLaVA-1.5's two linear layers with a GELU between them, mapping each
#   image patch feature to one "vision token" in the LM's embedding space;
# - the **language model**: a small Llama, first pretrained on the world's *text* so that it
#   plays the part of the pretrained LLM.
#
# Then stage 1 (feature alignment: projector only) and stage 2 (instruction tuning:
# projector and LM), each scored by the world's judge on held-out scenes, per task type.

# %% tags=["parameters"]
seed = 0  # random seed for data, initialisation and batches
device = "auto"  # "auto" picks cuda, then mps, then cpu; or name one
threads = 2  # CPU threads for torch (fixed so the printed numbers are reproducible)
output_dir = "../build/interactive"  # the runner sets it; metrics go to output_dir/metrics/3.2.json
cache_dir = "../.cache"  # shared artifacts (tokenizer, CLIP of 3.1.1, text-pretrained LM)
tokenizer_scenes = 2000  # scenes whose text trains the world's BPE (as in 3.0 and 3.1.1)
clip_train_scenes = 8000  # the 3.1.1 CLIP recipe (must match 3.1.1 to reuse its cached model)
clip_steps = 1800  # steps of the 3.1.1 CLIP recipe
clip_batch_size = 64  # batch size of the 3.1.1 CLIP recipe
lm_scenes = 20000  # scenes whose text-only conversations pretrain the LM
lm_steps = 2000  # optimiser steps of the LM's text-only pretraining
train_scenes = 3000  # scenes of the instruction data (one record of each task type per scene)
test_scenes = 60  # held-out scenes for the per-task evaluation
stage1_steps = 300  # stage 1 (projector only) optimiser steps, on description records
stage1_lr = 1e-3  # stage 1 peak learning rate (LLaVA-1.5: 1e-3)
stage2_steps = 2400  # stage 2 (projector + LM) optimiser steps, on all task types
stage2_lr = 2e-3  # stage 2 peak learning rate (LLaVA-1.5: 2e-5 for a 7B LM; a tiny LM takes more)
batch_size = 32  # conversations per batch in both stages
questions_per_conversation = 3  # stage 2: questions about one image joined in one conversation
merge_patches = 2  # n x n patches per vision token (2: 9 per image, one per cell; 1: LLaVA's 36)
max_new_tokens = 48  # longest generated answer, in tokens
progress = False  # show a tqdm progress bar while training (off in the committed outputs)
vlm_checkpoint = ""  # a LLaVA checkpoint (hub id or folder) to tune instead of the tiny one
lm_checkpoint = ""  # a causal LM checkpoint as the LLM instead of the text-pretrained tiny Llama
clip_checkpoint = ""  # a CLIP checkpoint whose vision tower to use instead of 3.1.1's tiny CLIP
train_json = ""  # a LLaVA-format JSON to train on (stage 2) instead of the world's records
stage1_json = ""  # stage 1's caption data (LLaVA JSON); default: train_json's description records
image_folder = ""  # where the JSON files' image paths are resolved (default: train_json's folder)
lora_rank = 0  # 0: stage 2 tunes the LM's weights; > 0: LoRA adapters of this rank (needs peft)
probe_scenes = 6000  # scenes whose vision tokens train the probe of "Where the errors..." (0: none)
probe_test_scenes = 300  # held-out scenes that score the probe and the model's descriptions
probe_steps = 1500  # optimiser steps of the probe (one small MLP shared by the 9 cells)
stage2_curve_points = 3  # times stage 2 is also scored part-way on the held-out records (0: never)

# %% [markdown]
# ## Setup

# %%
import time
from pathlib import Path

import matplotlib.pyplot as plt
from IPython.display import HTML, display

from companion.book import write_metrics
from companion.clip import pixel_values_for, pretrained_clip
from companion.data.llava import load_llava_json, validate_llava_records
from companion.evaluate import task_mean_difference, verdict
from companion.instruction import (IGNORE_INDEX, build_example, encode_file_data,
                                   encode_world_records, evaluate_tasks, generate_replies,
                                   instruction_records, publish_instruction_tuned,
                                   recipe_from_parameters, stage_records, train_stage)
from companion.lora import LoraSettings, add_lora, merge_lora
from companion.models import build_clip
from companion.plots import (plot_accuracy_against_compute, plot_curves, plot_grouped_bars,
                             plot_task_accuracy, show_images)
from companion.probe import (PROBE_ATTRIBUTES, cell_labels, description_cell_accuracy,
                             probe_accuracy, train_probe, vision_tokens)
from companion.runtime import setup
from companion.stages import trainable_summary
from companion.tokenizer import CHAT_TEMPLATE, assistant_mask_html, world_tokenizer
from companion.vlm import (build_lm, build_vlm, image_seq_length, image_token_id,
                           load_vlm, pretrained_lm, scene_as_text, text_only_conversations)
from companion.world import TASK_TYPES, make_instruction_dataset, make_scenes, render_scene

%matplotlib inline
dev = setup(seed=seed, device=device, threads=threads)
metrics = {}

# %% [markdown]
# ## The data format
#
# LLaVA's instruction data is a JSON list of records: an image path and a conversation whose
# turns alternate between the human (`from: human`) and the assistant (`gpt`, or `assistant`
# as the seed writes it). The image enters the conversation as a placeholder, `<image>`, in
# the first human turn. Here is the seed's own sample, checked by the companion's validator
# (the same one that reads real LLaVA files, reporting file, record and key on error):

# %%
seed_record = {
    "image": "path/to/image.jpg",
    "conversations": [
        {"from": "human", "value": "<image>\n这张图片里有什么？"},
        {"from": "assistant", "value": "这张图片显示了一只金毛犬在公园的草地上奔跑。"},
        {"from": "human", "value": "狗狗看起来开心吗？"},
        {"from": "assistant", "value": "是的，从它的肢体语言可以看出它非常开心。"},
    ],
}
validate_llava_records([seed_record])
print("the seed's sample is a valid LLaVA record:",
      len(seed_record["conversations"]) // 2, "question-answer turns")

# %% [markdown]
# The shapes world writes the same format for the six task types of the seed's table. Each
# record also carries `checks`: what a correct answer to each turn must contain, which is
# how the judge scores the model's free-text answers later.

# %%
recipe = recipe_from_parameters(globals())  # the recipe fields set in the parameters cell
scenes_by_id, records = instruction_records(recipe)
if train_json:  # a LLaVA data set from files: validated, every image checked
    image_folder = image_folder or str(Path(train_json).parent)
    records = load_llava_json(train_json, image_folder)
    print(f"training data: {len(records)} records from {train_json}")
test_scene_list = make_scenes(test_scenes, seed=seed + 3, start_id=40_000_000)
test_by_id = {s.scene_id: s for s in test_scene_list}
test_records = make_instruction_dataset(test_scene_list, seed=seed + 3)
for task in TASK_TYPES:
    record = next((r for r in test_records if r["task"] == task), None)
    if record is None:  # (OCR is only asked of scenes with a word)
        continue
    turns = record["conversations"]
    print(f"{task:>12}: {turns[0]['value'].replace(chr(10), ' ')!r} -> {turns[1]['value']!r}"
          + (f"  (+{len(turns) // 2 - 1} more turns)" if len(turns) > 2 else ""))
print(f"\n{len(records)} training records about {len(scenes_by_id)} scenes; {len(test_records)} "
      f"held-out records about {len(test_scene_list)} other scenes")

# %% [markdown]
# ## The model
#
# The vision tower comes from 3.1.1's cache (trained there, or now if this notebook runs
# alone). The LM is a tiny Llama pretrained on text only: the same kinds of conversations,
# with `<image>` replaced by a sentence that *describes* the scene ("Scene: a small red circle
# at the top left. ..."). From text alone it learns the answer formats and how to count,
# compare and locate things that are described to it. It has never seen an image: that is
# the situation of a real LLM before LLaVA's stage 1. Three choices in its recipe helped it
# most, on two CPU cores (each measured in the README's Benchmarks section):
# each conversation asks six questions about one scene, so the long scene sentence is read
# once for six answers; the loss reads only the replies, never the scene sentence it could
# not predict anyway; and a comparison is answered with its evidence before its verdict
# ("There is one triangle and no squares, so yes."), so the model counts before it decides.
# The corpus matters too: 20,000 scenes; on 3,000 the LM fitted the scenes it had seen.
#
# How many tokens one image becomes is a choice too. LLaVA-1.5 gives the LM one token per
# patch (576 for a 336-pixel image in 14-pixel patches); here that would be 36, four per
# cell of the scene's 3 × 3 grid, scattered over the sequence, and the LM would first have
# to learn which four belong together. `merge_patches = 2` joins each 2 × 2 block of
# neighbouring patches into one token before the projector (their features concatenated:
# the "pixel shuffle" of Idefics3, SmolVLM and nanoVLM; `companion/llava.py` writes it out),
# so the LM reads 9 tokens, one per cell in reading order, and the tower stays as 3.1.1
# trained it. Measured with `benchmarks/stage2_levers.py` on this notebook's held-out
# records (README, Benchmarks): at 1,600 stage-2 steps, 36 tokens answered 0.526 and
# 9 merged tokens 0.590, in less time; with 36 tokens twice the steps bought nothing
# (0.527), with 9 they bought 0.714 (hallucination 0.173 against 0.307).

# %%
tokenizer = world_tokenizer(cache_dir, n_scenes=tokenizer_scenes, log=None)
lm_history, lm_curve = [], []  # (a checkpoint brings no pretraining record)
if vlm_checkpoint:
    vlm, processor, tokenizer = load_vlm(vlm_checkpoint, device=dev)
else:
    if clip_checkpoint:
        clip, processor, _ = build_clip(checkpoint=clip_checkpoint)
    else:
        clip, processor, _ = pretrained_clip(cache_dir, recipe.clip_recipe(), device=dev, log=None)
    if lm_checkpoint:
        lm, tokenizer = build_lm(checkpoint=lm_checkpoint)
    else:
        start = time.perf_counter()
        lm, lm_history, lm_curve = pretrained_lm(cache_dir, tokenizer, recipe.lm_recipe(),
                                                 device=dev, log=None, with_curve=True)
        lm_seconds = time.perf_counter() - start
    vlm = build_vlm(clip, lm, tokenizer, seed=seed, merge_patches=merge_patches).to(dev)
n_image_tokens = image_seq_length(vlm)
image_size = vlm.config.vision_config.image_size
for part, (_, total) in trainable_summary(vlm).items():
    print(f"{part:>9}: {total / 1e6:.3f} M parameters")
merged = getattr(vlm.config, "merge_patches", 1)
print(f"one image = {n_image_tokens} vision tokens ({image_size}x{image_size} pixels, "
      f"{vlm.config.vision_config.patch_size}-pixel patches, CLS dropped"
      + (f", {merged} x {merged} patches per token)" if merged > 1 else ")"))

# %% [markdown]
# ## The model's view of a sample: which tokens carry the loss
#
# The collator renders a conversation through the tokenizer's chat template, expands
# `<image>` into one placeholder per vision token (the model swaps in the projected image
# features there), and builds the labels: a copy of the input ids on the assistant's replies
# and their end-of-turn token, `-100` (ignored by the cross-entropy) everywhere else. Green
# tokens below carry loss; grey ones are context.

# %%
multi = next(r for r in test_records if r["task"] == "multi_turn")
example = build_example(tokenizer, multi["conversations"], n_image_tokens,
                        image_token_id(tokenizer))
in_loss = [label != IGNORE_INDEX for label in example["labels"]]
display(HTML(assistant_mask_html(tokenizer, {"input_ids": example["input_ids"],
                                             "assistant_mask": in_loss})))
n_image = example["input_ids"].count(image_token_id(tokenizer))
print(f"{len(in_loss)} tokens: {n_image} vision tokens, {sum(in_loss)} carry loss, "
      f"{len(in_loss) - n_image - sum(in_loss)} are template and human text")

# %% [markdown]
# The labels can be written by hand from the turn structure alone. In the rendered ids every
# reply follows the assistant's header (the `<|assistant|>` token and a line break) and runs
# to the `<|end|>` token that closes its turn. The labels copy those ids, `<|end|>` included
# (that is how the model learns to stop), and are -100 everywhere else. `build_example` finds
# the replies another way, from the `{% generation %}` block of the chat template; the two
# agree token by token, and each span decodes to one of the record's replies:

# %%
if tokenizer.chat_template == CHAT_TEMPLATE:  # (a checkpoint's template marks its own turns)
    sample_ids = example["input_ids"]
    assistant_header = tokenizer("<|assistant|>\n", add_special_tokens=False)["input_ids"]
    end_of_turn = tokenizer.convert_tokens_to_ids("<|end|>")
    labels_by_hand, reply_spans = [IGNORE_INDEX] * len(sample_ids), []
    for position in range(len(sample_ids) - len(assistant_header)):
        if sample_ids[position:position + len(assistant_header)] == assistant_header:
            first = position + len(assistant_header)  # the reply starts after the header
            span = slice(first, sample_ids.index(end_of_turn, first) + 1)  # ... to <|end|>
            labels_by_hand[span] = sample_ids[span]
            reply_spans.append(span)
    assert labels_by_hand == example["labels"]
    assert [tokenizer.decode(sample_ids[span][:-1]) for span in reply_spans] == [
        turn["value"] for turn in multi["conversations"] if turn["from"] == "gpt"]
    print(f"labels by hand = build_example's labels at all {len(sample_ids)} positions: "
          f"{len(reply_spans)} replies, {sum(s.stop - s.start for s in reply_spans)} "
          "tokens in the loss")
else:
    print("(the labels by hand read the world's chat template; this tokenizer has its own)")

# %% [markdown]
# Why only the assistant's tokens? The model's job is to *answer*. The questions are given,
# not generated: putting them in the loss would spend capacity on predicting what users ask,
# and would teach the model to continue a conversation by writing the user's next question.
# In this record most tokens are context (the vision tokens and the questions); the loss
# averages over the few tokens that are the reply. The same function, `build_example`,
# checks the edge cases: a conversation cut by `max_length` keeps its image tokens (an error
# says so if it cannot), and one left with no assistant token is reported and skipped rather
# than trained as a zero loss.

# %% [markdown]
# ## Encoding the training set
#
# Every record is encoded once (tokens, labels, and its image through the vision tower's own
# image processor). Stage 1 uses the description records alone, as LLaVA's stage 1 uses
# image-caption pairs; stage 2 uses every task type, and joins a scene's questions
# `questions_per_conversation` at a time into one multi-turn conversation, as LLaVA's
# conversation data asks several questions about one image: the image's vision tokens are
# then read once for three answers. (Measured by `benchmarks/stage2_levers.py` on these
# held-out records, with 36 vision tokens: 0.526 this way against 0.472 with one question per
# conversation at the same 1,600 steps, 0.527 with one question and twice the steps, 0.489
# with six questions and 1,000 steps; README, Benchmarks.)

# %%
if train_json:
    stage1_records = load_llava_json(stage1_json, image_folder) if stage1_json else None
    stage_data = encode_file_data(records, image_folder, tokenizer, processor, n_image_tokens,
                                  stage1_records)
else:  # the recipe's split: descriptions for stage 1; stage 2 asks several questions per image
    stage_data = {stage: encode_world_records(rows, scenes_by_id, tokenizer, processor,
                                              n_image_tokens, image_size)
                  for stage, rows in stage_records(recipe, records).items()}
train_captions, train_all = stage_data["stage1"], stage_data["stage2"]
test_pixels = pixel_values_for(processor, [render_scene(test_by_id[r["scene_id"]], image_size)
                                           for r in test_records])
stage2_tasks = [task for joined in train_all.tasks for task in joined.split("+")]
print(f"stage 1: {len(train_captions)} description records; stage 2: {len(train_all)} "
      f"conversations asking {len(stage2_tasks)} questions of {len(set(stage2_tasks))} task "
      f"types; skipped (no assistant token): "
      f"{sum('no image' not in why for _, why in train_all.skipped)}")
if train_json:
    print(f"from files: stage 1 {'from ' + stage1_json if stage1_json else 'as above'}; "
          f"text-only records left out: {sum('no image' in why for _, why in train_all.skipped)}")

# %% [markdown]
# Three helpers serve the rest of the notebook: `run_stage` freezes the model as a LLaVA
# stage does and trains it with the shared loop (timing it), `evaluate` lets the model answer
# every held-out question for the judge to score, and `score` keeps the summary in the metrics.

# %%
seconds = {}


def run_stage(stage, data, steps, lr, after_step=None):
    """Freeze the model as LLaVA's `stage` does, then train it with the shared loop."""
    start = time.perf_counter()
    history = train_stage(vlm, stage, data, steps, lr, batch_size, seed, tokenizer.pad_token_id,
                          device=dev, progress=progress, after_step=after_step)
    seconds[stage] = time.perf_counter() - start
    return history


def evaluate():
    return evaluate_tasks(vlm, tokenizer, test_records, test_by_id, test_pixels,
                          max_new_tokens=max_new_tokens)


def score(name):
    scores = evaluate()
    table = scores.by_task()
    metrics[name] = {task: round(row["accuracy"], 4) for task, row in table.items()}
    metrics[f"{name}_mean_task_accuracy"] = scores.mean_task_accuracy()
    metrics[f"{name}_hallucination_rate"] = scores.hallucination_rate()
    return scores

# %% [markdown]
# ## Before any multimodal training
#
# The assembled model has a random projector: the LM receives vision tokens it has never
# seen where it expects a description. What does it say?

# %% tags=["nbval-ignore-output"]
before = score("before")
for answer in before.answers[:3]:
    print(f"Q: {answer['question']}\nA: {answer['answer']!r}\n"
          f"   (reference: {answer['reference']!r})")
print(f"mean task accuracy {metrics['before_mean_task_accuracy']:.3f}")

# %% [markdown]
# A second reference point: the LM on its own, given each held-out scene *in words* (the
# sentence its text-only pretraining put where the image goes) instead of the image. It
# never has to see anything, so this is what the pretrained LM can do with a perfect
# description of the scene in front of it. (Grounding asks for a box, which that sentence
# does not contain.)

# %% tags=["trained-figures"]
text_only = None
if not vlm_checkpoint:  # (a LLaVA checkpoint brings no separate LM to ask)
    text_records = [{**r, "conversations": c} for r, c in
                    zip(test_records, text_only_conversations(test_records, test_by_id))]
    text_only = evaluate_tasks(lm, tokenizer, text_records, test_by_id, None,
                               max_new_tokens=max_new_tokens)
    metrics["text_lm"] = {t: round(row["accuracy"], 4) for t, row in text_only.by_task().items()}
    metrics["text_lm_mean_task_accuracy"] = text_only.mean_task_accuracy()
    print(f"the LM alone, told the scene in words: mean task accuracy "
          f"{text_only.mean_task_accuracy():.3f}")

# %% [markdown]
# ## Stage 1: feature alignment (projector only)
#
# LLaVA's stage 1 freezes the vision encoder *and* the LLM and trains only the projector on
# image-caption pairs (595K pairs filtered from CC3M). The LM cannot change; the projector
# must learn to produce vision tokens that the frozen LM reads like a description of the
# image. Here: description records, projector only.

# %% tags=["trained-figures"]
stage1 = run_stage("stage1", train_captions, stage1_steps, stage1_lr)
after1 = score("stage1")

# %% [markdown]
# ## Stage 2: instruction tuning (projector and LM)
#
# Stage 2 keeps the vision encoder frozen and trains the projector and the LM on the
# instruction data (LLaVA-1.5: 665K conversations) of every task type. (For an LLM too large
# to tune in full, `lora_rank > 0` trains low-rank adapters on its linear layers instead and
# folds them into the weights afterwards: `companion.lora`. LLaVA-1.5 publishes such a LoRA
# variant, rank 128.)

# %% tags=["trained-figures"]
if lora_rank:  # adapters on the LM's linear layers learn; its own weights stay frozen
    adapter_count = add_lora(vlm, LoraSettings(rank=lora_rank, alpha=2 * lora_rank))
    print(f"LoRA rank {lora_rank}: {adapter_count / 1e6:.3f} M adapter parameters")
# part-way scores for the compute curve below (greedy decoding draws no random numbers, so
# measuring does not change the run; the measuring time is not counted as training time)
curve_steps = {stage2_steps * (k + 1) // (stage2_curve_points + 1)
               for k in range(stage2_curve_points)} - {0}
stage2_curve, measuring = [], []


def measure_part_way(step):
    if step + 1 in curve_steps and not lora_rank:
        began = time.perf_counter()
        vlm.eval()
        stage2_curve.append((step + 1, evaluate().mean_task_accuracy()))
        vlm.train()
        measuring.append(time.perf_counter() - began)


stage2 = run_stage("stage2", train_all, stage2_steps, stage2_lr, after_step=measure_part_way)
seconds["stage2"] -= sum(measuring)
merge_lora(vlm)  # adapters folded into the weights: a plain LLaVA again (nothing to do without)
after2 = score("stage2")

# %% [markdown]
# ## The curves, and what each stage bought per task type

# %%
fig, axes = plt.subplots(1, 3, figsize=(14, 3.4))
if lm_history:
    plot_curves({"text-only LM": ([r["step"] for r in lm_history],
                                  [r["loss"] for r in lm_history])},
                "LM pretraining on the world's text", ylabel="loss", ax=axes[0], smooth=10)
plot_curves({"stage 1": stage1.series("loss")}, "Stage 1: projector only", ylabel="loss",
            ax=axes[1], smooth=10)
plot_curves({"stage 2": stage2.series("loss")}, "Stage 2: projector + LM", ylabel="loss",
            ax=axes[2], smooth=10)
plt.show()

# %% [markdown]
# ## Accuracy against training compute
#
# Loss curves say that training went on; whether more of it would help shows on the judged
# accuracy itself. The LM was measured while it pretrained (on the first 50 of these
# held-out scenes, told in words; cached with it), and stage 2 part-way through, on the same
# held-out records as the table. Where a curve still climbs at its last point, more compute
# (a longer schedule, or a GPU run of the `gpu` profile) buys accuracy; where it has
# flattened, the recipe or the model's size is the limit, not the number of steps.

# %% tags=["trained-figures"]
if lm_curve:
    print("LM told in words (first 50 held-out scenes): "
          + ", ".join(f"{p['step']} steps {p['mean_task_accuracy']:.3f}" for p in lm_curve))
points = [*stage2_curve, (stage2_steps, after2.mean_task_accuracy())]
fig = plot_accuracy_against_compute(lm_curve, points, TASK_TYPES,
                                    text_only.mean_task_accuracy() if text_only else None)
plt.show()
print("stage 2 (held-out mean task accuracy): "
      + ", ".join(f"{step} steps {acc:.3f}" for step, acc in points))
metrics["lm_curve"] = lm_curve
metrics["stage2_curve"] = [{"step": step, "mean_task_accuracy": acc} for step, acc in points]

# %% tags=["nbval-ignore-output"]
table1, table2, table0 = after1.by_task(), after2.by_task(), before.by_task()
table_text = text_only.by_task() if text_only else {}
rows = [("task", "text LM", "before", "stage 1", "stage 2", "hallucinations (stage 2)")]
for task in table2:
    rows.append((task, f"{table_text[task]['accuracy']:.2f}" if task in table_text else "-",
                 f"{table0[task]['accuracy']:.2f}", f"{table1[task]['accuracy']:.2f}",
                 f"{table2[task]['accuracy']:.2f}", f"{table2[task]['hallucination_rate']:.2f}"))
rows.append(("mean", f"{text_only.mean_task_accuracy():.2f}" if text_only else "-",
             f"{before.mean_task_accuracy():.2f}", f"{after1.mean_task_accuracy():.2f}",
             f"{after2.mean_task_accuracy():.2f}", f"{after2.hallucination_rate():.2f}"))
for row in rows:
    print(f"{row[0]:>12} {row[1]:>8} {row[2]:>8} {row[3]:>8} {row[4]:>8} {row[5]:>24}")
print("(text LM: the pretrained LM told the scene in words, no image)")
if text_only:
    ahead = [t for t in table2 if t in table_text
             and table2[t]["accuracy"] > table_text[t]["accuracy"]]
    print(f"after stage 2 the model, reading pixels, beats the text LM reading a perfect "
          f"description on {len(ahead)} of {len(table2)} task types ({', '.join(ahead)})")
print(f"\nstage 1 changed the mean accuracy by "
      f"{after1.mean_task_accuracy() - before.mean_task_accuracy():+.3f}; "
      f"stage 2 by {after2.mean_task_accuracy() - after1.mean_task_accuracy():+.3f}")

# %% [markdown]
# Both models answered the same held-out questions, so they can be compared answer by answer
# (paired): stage 2 against stage 1 per task type, with one standard error of the change.

# %% tags=["nbval-ignore-output"]
stage_change = task_mean_difference(after1, after2)
print("stage 2 against stage 1 (paired, ± 1 standard error):")
for task, c in [*stage_change["by_task"].items(), ("mean", stage_change)]:
    print(f"{task:>12} {c['difference']:+.3f} ± {c['se']:.3f}  {verdict(c['difference'], c['se'])}")
clearly_above = [t for t, c in stage_change["by_task"].items()
                 if verdict(c["difference"], c["se"]) == "helped"]
print(f"clearly above stage 1 (beyond 2 se): {len(clearly_above)} of {len(table2)} task types")
metrics["stage2_vs_stage1"] = {
    t: {"change": c["difference"], "se": c["se"]}
    for t, c in [*stage_change["by_task"].items(), ("mean", stage_change)]}
metrics["stage2_min_task_accuracy"] = min(row["accuracy"] for row in table2.values())

# %% [markdown]
# The table's accuracies, as bars:

# %% tags=["nbval-ignore-output"]
fig = plot_task_accuracy({"before": table0, "stage 1": table1, "stage 2": table2},
                         f"Accuracy per task type on {len(test_records)} held-out records")
plt.show()

# %% [markdown]
# How to read this. Stage 1 teaches the projector alone to produce vision tokens that the
# frozen LM reads like a description; with an LM this small (two layers) and 300 steps,
# that alignment is weak: the table shows what it carried over to each task, and whether
# the mean moved at all. (A few vision tokens are not a sentence, and the frozen LM has only
# ever read sentences; in 300 steps the projector alone does not make its tokens read like
# one.) Stage 2 lets the LM itself learn to read the vision tokens and answer every task
# type: that is where the gains come from here. The hardest checks are the strictest: a
# description passes only if *every* object is named with the right size, colour, shape and
# position and nothing is added, and a box needs an overlap (IoU) of at least 0.5.
# The paired lines under the table compare stage 2 with stage 1 on the same questions,
# answer by answer: a change counts as clear when it exceeds two standard errors, which is
# what "clearly above its stage-1 figure" means in numbers at this many held-out answers.
# The text-LM column is a reference for the language side: the LM as its text-only
# pretraining left it, told the scene exactly. It is no ceiling: stage 2 goes on training
# that same LM on the tasks themselves, so the model can end up ahead of it while working
# from pixels (the line under the table counts where).

# %% [markdown]
# ## Where the errors come from: what the vision tokens carry
#
# A wrong description has two possible causes. Either the vision tokens never carried the
# fact (the frozen tower lost it, or the projector did), or they carried it and the LM did
# not read it out. A *probe* separates the two: a small classifier trained on the vision
# tokens alone. Each of the 9 cells of a scene covers 2 × 2 patches in this model, so the
# probe is one small MLP that reads the 4 tokens of a cell and predicts whether the cell
# holds an object and that object's shape, colour and size (the same MLP for every cell, as
# a shape looks the same anywhere). It is trained on fresh scenes and scored on held-out
# ones. The model's own descriptions of the same held-out scenes are scored cell by cell on
# the same four questions: a cell holds an object if the description puts one there, and an
# attribute is right if the description states the right value at that cell (an object left
# out is wrong on all three).

# %% tags=["trained-figures"]
token_gigabytes = 4 * probe_scenes * n_image_tokens * vlm.config.text_config.hidden_size / 1e9
run_probe = probe_scenes > 0 and token_gigabytes < 4  # (a real LLaVA: 576 x 4096 per image)
if run_probe:
    def tokens_and_labels(scenes):
        pixels = pixel_values_for(processor, [render_scene(s, image_size) for s in scenes])
        return vision_tokens(vlm, pixels), cell_labels(scenes), pixels

    start = time.perf_counter()
    probe_train = make_scenes(probe_scenes, seed=seed + 4, start_id=41_000_000)
    probe_held = make_scenes(probe_test_scenes, seed=seed + 5, start_id=42_000_000)
    train_tokens, train_labels, _ = tokens_and_labels(probe_train)
    held_tokens, held_labels, held_pixels = tokens_and_labels(probe_held)
    probe_run = train_probe(train_tokens, train_labels, steps=probe_steps, seed=seed)
    read_by_probe = probe_accuracy(probe_run.probe, held_tokens, held_labels)
    describe = [{"from": "human", "value": "<image>\nDescribe the image."}]
    descriptions = generate_replies(vlm, tokenizer, [describe] * len(probe_held), held_pixels,
                                    max_new_tokens=max_new_tokens)
    said_by_model = description_cell_accuracy(probe_held, descriptions)
    seconds["probe"] = time.perf_counter() - start
    metrics["probe"] = {"vision_tokens": read_by_probe, "descriptions": said_by_model}
    for attribute in ("shape", "color", "size"):  # the vision tower's targets (3.5)
        metrics[f"probe_{attribute}_accuracy"] = read_by_probe[attribute]

# %% [markdown]
# The probe's accuracy on the held-out scenes' vision tokens, beside the descriptions':

# %% tags=["trained-figures"]
if probe_scenes and not run_probe:
    print(f"probe skipped: the vision tokens of {probe_scenes} scenes would take "
          f"{token_gigabytes:.0f} GB; lower probe_scenes to run it")
if run_probe:
    columns = PROBE_ATTRIBUTES + ("whole scene",)
    print(f"{len(probe_held)} held-out scenes, {int((held_labels[..., 0] == 1).sum())} objects; "
          f"the probe trained on the vision tokens of {len(probe_train)} other scenes\n")
    print(f"{'':>24}" + "".join(f"{c:>13}" for c in columns))
    for name, row in (("probe on vision tokens", read_by_probe),
                      ("model's descriptions", said_by_model)):
        print(f"{name:>24}" + "".join(f"{row[c]:>13.3f}" for c in columns))
    fig = plot_grouped_bars(
        {"probe on the vision tokens": read_by_probe, "the model's descriptions": said_by_model},
        columns, "What the vision tokens carry vs what the model says (held-out scenes)",
        "accuracy per cell (whole scene: all cells)", ylim=(0, 1.3), legend_loc="upper center")
    plt.show()

# %% [markdown]
# How to read this. Where the probe is near 1 and the descriptions are well below it, the
# fact reached the LM and the LM did not use it: the limit is in how the LM reads the vision
# tokens (its size, and how much stage-2 training it got), not in what the tower sees. Where
# the probe itself falls short, part of the fact may never have reached the LM: the frozen
# tower (0.25 M parameters, 8-pixel patches) or the projector lost it, and a better vision
# encoder is what helps. The probe only gives a lower bound on what the tokens carry (a
# stronger probe, or more scenes to train it, could read more). Both readings are printed
# below.

# %% tags=["trained-figures"]
if run_probe:
    attributes = PROBE_ATTRIBUTES[1:]
    lost = min(attributes, key=lambda a: read_by_probe[a])
    unused = max(attributes, key=lambda a: read_by_probe[a] - said_by_model[a])
    print(f"weakest in the vision tokens: {lost} (probe {read_by_probe[lost]:.3f}); largest gap "
          f"between tokens and words: {unused} (probe {read_by_probe[unused]:.3f}, descriptions "
          f"{said_by_model[unused]:.3f})")
    print(f"a whole scene right: probe {read_by_probe['whole scene']:.3f}, descriptions "
          f"{said_by_model['whole scene']:.3f}")

# %% [markdown]
# ## A conversation about a held-out image
#
# The model's own answers stay in the context: each question follows what it said before.

# %% tags=["nbval-ignore-output"]
chat_scene = test_scene_list[1]
questions = ["<image>\nDescribe the image.", "How many objects are there?",
             "Where is the " + chat_scene.objects[0].shape + "?",
             "What word is written in the image?"]
conversation = []
pixels = pixel_values_for(processor, [render_scene(chat_scene, image_size)])
for question in questions:
    conversation.append({"from": "human", "value": question})
    reply = generate_replies(vlm, tokenizer, [conversation], pixels,
                             max_new_tokens=max_new_tokens)[0]
    conversation.append({"from": "gpt", "value": reply})
    print(f"user:      {question.replace(chr(10), ' ').replace('<image> ', '')}\n"
          f"assistant: {reply}")
print("\nground truth:", scene_as_text(chat_scene))
fig = show_images([render_scene(chat_scene, 160)], ["the held-out image of this chat"], columns=1)

# %% [markdown]
# ## Summary
#
# Measured in this run (also written to the metrics file):

# %% tags=["trained-figures"]
write_metrics("3.2", metrics, output_dir)
world_run = not (vlm_checkpoint or lm_checkpoint or clip_checkpoint or train_json or lora_rank)
if world_run:  # later sections (RLHF, DPO) start from this model
    publish_instruction_tuned(cache_dir, recipe, vlm, processor, tokenizer,
                              {"stage1": stage1, "stage2": stage2}, log=None)
print(f"mean task accuracy: before {metrics['before_mean_task_accuracy']:.3f}, after stage 1 "
      f"{metrics['stage1_mean_task_accuracy']:.3f}, after stage 2 "
      f"{metrics['stage2_mean_task_accuracy']:.3f}; hallucination rate after stage 2 "
      f"{metrics['stage2_hallucination_rate']:.3f}")

# %% tags=["nbval-ignore-output"]
if not vlm_checkpoint and not lm_checkpoint:
    seconds["LM (built or loaded)"] = lm_seconds
print("wall times:", {name: f"{value:.0f} s" for name, value in seconds.items()})
