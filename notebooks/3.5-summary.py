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
# # 3.5 Summary: the training paradigms, measured (总结)
#
# The seed closes the chapter with one table: each training stage, its goal, its data and
# the parameters it trains. This notebook prints that table with the numbers *this* run of
# the book measured beside each row. It trains nothing: it reads the metrics file every
# earlier notebook wrote (`output_dir/metrics/<chapter>.json`). A chapter that has not run
# shows a dash and the command that would produce its numbers, so the notebook also runs
# alone, and never shows a figure that was not measured.

# %% tags=["parameters"]
seed = 0  # unused here (nothing is random); kept so every chapter takes the same parameters
device = "auto"  # unused here (nothing is trained); kept for the same reason
threads = 2  # unused here
output_dir = "../build/interactive"  # the run whose metrics are summarised
#   (and where 3.5.json goes)
cache_dir = "../.cache"  # unused here
book_file = "../book.toml"  # the book whose chapters and gpu profile the run guide lists

# %%
from pathlib import Path

import matplotlib.pyplot as plt

from companion.book import load_book, write_metrics
from companion.plots import plot_model_path
from companion.summary import load_chapter_metrics, metric_at, summary_rows

# %matplotlib inline
metrics_dir = Path(output_dir) / "metrics"
book = load_book(book_file)
chapters = [c.id for c in book.chapters if c.id != "3.5"]
loaded = load_chapter_metrics(metrics_dir, chapters)
print("chapters with metrics in this run:", [c for c, m in loaded.items() if m is not None])
print("chapters not run yet:", [c for c, m in loaded.items() if m is None] or "none")

# %% [markdown]
# ## The seed's table, with this run's numbers
#
# Rows are the seed's four stages (训练阶段 / 目标 / 数据 / 训练参数), plus image-text
# matching (3.1.2) and the whole pipeline (3.4). Every number is read from a metrics file;
# the last column says which.

# %% tags=["trained-figures"]
rows = summary_rows(metrics_dir)
previous = None
for row in rows:
    if row["stage"] != previous:
        print(f"\n{row['stage']}\n  goal: {row['goal']}; data: {row['data']}; "
              f"trains: {row['trains']}")
        previous = row["stage"]
    print(f"    {row['measure']:<52} {row['shown']:>7}   ({row['source']})")
measured = sum(row["value"] is not None for row in rows)
print(f"\n{measured} of {len(rows)} figures measured in this run")

# %% [markdown]
# ## Is the model strong enough for the lessons?
#
# The later lessons stand on the 3.2 model: preference tuning can only remove errors the
# model knows how to avoid, and a trick's effect is only visible above the noise of a model
# that already works. These are the figures the chapter's model is meant to reach (its open
# issue names them), each with its bound and whether this run reached it. The first says
# what the language model can do with a perfect description of the scene; the probe rows,
# what the vision tokens carry; the last three, the instruction-tuned model itself.
#
# The second block is RLHF's (3.3): a factual reward model that ranks held-out pairs, and
# DPO and PPO that each leave at least 30% fewer hallucinations than the SFT model (the
# paired change, with its standard error, over the SFT rate) while losing at most 2 points
# of task accuracy; the KL figures show how far PPO with and without its penalty drifted.
# The SFT model there is 3.2's recipe trained on machine-written data; 3.2's clean model
# and the hallucination learned from the data (the two paired on the same answers) say how
# much of its rate preference tuning could reach at all.

# %% tags=["nbval-ignore-output"]
from companion.summary import RLHF_ROWS, TARGET_ROWS

for block in (TARGET_ROWS, RLHF_ROWS):
    targets = summary_rows(metrics_dir, block)
    print(block[0].stage)
    for row in targets:
        reached = {True: "reached", False: "not yet", None: "—"}[row["met"]]
        print(f"    {row['measure']:<52} {row['shown']:>7}  {row['target']:>6}  {reached:<8}"
              f"({row['source']})")
    print(f"{sum(r['met'] is True for r in targets)} of "
          f"{sum(r['target'] != '' for r in targets)} targets reached in this run\n")

# %% [markdown]
# ## One model's path through the chapter
#
# Mean task accuracy and hallucination rate on the same held-out records, from "LM and CLIP
# bolted together" to the preference-tuned policies. 3.3 starts from 3.2's recipe trained
# on machine-written data (3.3.1 sets it beside 3.2's clean model), so the path steps from
# the clean stage 2 to that model before PPO and DPO start from it:

# %% tags=["trained-figures"]
path = [("assembled (3.2)", "3.2", "before_mean_task_accuracy", "before_hallucination_rate"),
        ("stage 1 (3.2)", "3.2", "stage1_mean_task_accuracy", "stage1_hallucination_rate"),
        ("stage 2 (3.2)", "3.2", "stage2_mean_task_accuracy", "stage2_hallucination_rate"),
        ("machine-written SFT (3.3)", "3.3.3", "heldout/SFT/mean_task_accuracy",
         "heldout/SFT/hallucination_rate"),
        ("PPO (3.3.2)", "3.3.2", "heldout/PPO/mean_task_accuracy",
         "heldout/PPO/hallucination_rate"),
        ("DPO (3.3.3)", "3.3.3", "heldout/DPO/mean_task_accuracy",
         "heldout/DPO/hallucination_rate")]
points = []
for label, chapter, accuracy, hallucination in path:
    if loaded.get(chapter) is None:
        print(f"{label:>25}: chapter {chapter} not run")
        continue
    points.append((label, metric_at(loaded[chapter], accuracy),
                   metric_at(loaded[chapter], hallucination)))
    print(f"{label:>25}: mean task accuracy {points[-1][1]:.3f}, "
          f"hallucination rate {points[-1][2]:.3f}")
if points:
    fig = plot_model_path(points, "3.2's recipe through instruction tuning and preference tuning")
    plt.show()

# %% [markdown]
# The line above moves a little at each step, but a little can be noise. 3.3.2 and 3.3.3
# measure each preference-tuned policy against the SFT model answer by answer, on the same
# held-out questions; their verdicts, with the standard errors, are:

# %% tags=["nbval-ignore-output"]
for chapter in ("3.3.2", "3.3.3"):
    changes = (loaded.get(chapter) or {}).get("versus_sft")
    if not changes:
        print(f"{chapter} has not run: python -m companion book run {chapter}")
        continue
    for name, change in changes.items():
        if chapter == "3.3.3" and name == "PPO (3.3.2)":
            continue  # 3.3.2's policy, reloaded: its row is printed above
        print(f"{name:>12} ({chapter}): hallucination {change['hallucination_change']:+.3f} "
              f"± {change['hallucination_se']:.3f}, task accuracy {change['accuracy_change']:+.3f} "
              f"± {change['accuracy_se']:.3f}: {change['verdict']}")

# %% [markdown]
# ## The training tricks, as measured in 3.4

# %% tags=["nbval-ignore-output"]
tricks = (loaded.get("3.4") or {}).get("tricks", [])
for row in tricks:
    print(f"{row['trick']:>24} | {row['arm']:<30} answers correct {row['accuracy_change']:+.3f} "
          f"± {row['accuracy_se']:.3f}: {row['verdict']}")
if not tricks:
    print("3.4 has not run (or ran with run_tricks=False): python -m companion book run 3.4")

# %% [markdown]
# ## Running the chapter on a GPU with real models
#
# Every notebook takes its sizes, its device and (where it makes sense) a real checkpoint as
# papermill parameters. The `gpu` profile in `book.toml` sets larger worlds and longer
# training and `device = "cuda"`; 3.4's gpu profile carries LLaVA-1.5's published stage 1 and
# stage 2 settings. Run one chapter, or all of them in order, with the book runner (it writes
# the executed notebooks and metrics under `build/gpu/`, and this summary reads them with
# `-p output_dir ../build/gpu`):
#
# ```
# python -m companion book run --profile gpu            # every chapter, in book order
# python -m companion book run 3.5 --profile gpu        # this summary of that run
# ```
#
# The parameters that take real checkpoints and real data files, and the same run by hand
# with papermill:

# %%
from companion.summary import gpu_commands

for entry in gpu_commands(book):
    real = ", ".join(entry["checkpoints"]) or "(none: the world's own models)"
    print(f"{entry['chapter']:>6}  {entry['book']}\n        real checkpoints: {real}")
    if entry["data_files"]:
        print(f"        real data files: {', '.join(entry['data_files'])}")
print("\nby hand, e.g.:", next(e for e in gpu_commands(book) if e["chapter"] == "3.2")["papermill"])

# %% [markdown]
# Two things change with real checkpoints. A pretrained CLIP and LLM replace the first two
# stages of the pipeline, exactly as LLaVA starts, and the learning rates of the LLaVA stages
# go back to the published ones (2e-5 for a 7B LLM in stage 2; the tiny LM of this book needs
# about a hundred times more). And evaluation moves from the world's judge to real
# benchmarks: the judge is what made every number above checkable.

# %%
write_metrics("3.5", {"chapters_with_metrics": sum(m is not None for m in loaded.values()),
                      "figures_measured": measured, "figures": len(rows)}, output_dir)
print(f"summary written: {measured} of {len(rows)} figures")
