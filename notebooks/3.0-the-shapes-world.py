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
# # 3.0 The shapes world and the tools (训练范式：数据与工具)
#
# This chapter (第三章 训练范式) follows how a vision-language model is trained: contrastive
# pre-training, image-text matching and image-grounded generation (3.1), instruction tuning
# (3.2), learning from preferences with RLHF and DPO (3.3), and the whole LLaVA-1.5 recipe
# (3.4). Every method is trained for real in these notebooks, on a laptop CPU, in minutes.
#
# That needs data small enough to learn from in minutes and rich enough to ask every kind of
# question the chapter asks, and it needs a way to *check* a model's answers automatically:
# RLHF needs a labeler, and a hallucination rate needs ground truth. So instead of COCO and
# human annotators we use a procedurally generated **shapes world**: scenes of a few coloured
# shapes, sometimes with a short word written in them, each carrying its exact ground truth.
#
# This notebook introduces the world and the tools the later sections share:
#
# - scenes and their captions (for contrastive learning, matching and captioning);
# - instruction samples of the six task types of the seed's table, in LLaVA's JSON format;
# - the judge that scores a free-text answer against the scene;
# - the tokenizer and its chat template, which decides which tokens carry the loss.

# %% tags=["parameters"]
seed = 0  # random seed of the scenes shown here
device = "auto"  # "auto" picks cuda, then mps, then cpu (nothing here needs one)
threads = 2  # CPU threads for torch (fixed so the printed numbers are reproducible)
output_dir = "../build/interactive"  # the runner sets it; metrics go to output_dir/metrics/3.0.json
cache_dir = "../.cache"  # shared artifacts (the tokenizer), keyed by their config
n_scenes = 8  # scenes in the grid below
image_size = 96  # pixels per side of the rendered images shown here
tokenizer_scenes = 2000  # scenes whose text trains the world's BPE tokenizer
vocab_size = 600  # BPE vocabulary size (256 bytes + special tokens + merges)

# %%
import json
import tempfile
from pathlib import Path

from companion.book import write_metrics
from companion.data.llava import validate_llava_records, LlavaFormatError
from companion.plots import show_images
from companion.runtime import setup
from companion.tokenizer import encode_chat, world_tokenizer
from companion.world import (TASK_TYPES, WorldConfig, export_llava_dataset, judge_answer,
                             load_world_dataset, make_instruction_dataset, make_scenes,
                             make_task_sample, render_scene, scene_captions)

%matplotlib inline
dev = setup(seed=seed, device=device, threads=threads)
metrics = {}

# %% [markdown]
# ## Scenes
#
# A scene is a 3×3 grid with one to four objects, at most one per cell. Each object has a
# shape, a colour, a size and a bounding box; some scenes also have a word written in a free
# cell (for OCR). `make_scenes(n, seed)` is deterministic: the same seed gives the same
# scenes, and `render_scene` the same pixels, byte for byte.

# %%
scenes = make_scenes(n_scenes, seed=seed)
print(WorldConfig())
for obj in scenes[0].objects:
    print(obj)
print("word:", scenes[0].word, "in cell", scenes[0].word_region)

# %%
fig = show_images([render_scene(s, image_size) for s in scenes],
                  [scene_captions(s)[0] for s in scenes], columns=4,
                  suptitle="Scenes of the shapes world with their canonical captions")

# %% [markdown]
# ## Captions
#
# Each scene has several phrasings of the same ground truth. Contrastive training (3.1.1)
# samples a phrasing per step, so the text encoder must learn what the phrasings share.

# %%
for caption in scene_captions(scenes[0]):
    print("-", caption)

# %% [markdown]
# ## Instruction data: the six task types, in LLaVA's format
#
# The seed's table of instruction-tuning tasks (指令微调的任务类型): description (图像描述),
# visual question answering such as counting (视觉问答), OCR, reasoning (推理), multi-turn
# dialogue (对话) and grounding (定位). Each record follows the seed's JSON format (the one
# LLaVA uses): an `image` path and `conversations`, alternating `human` and `gpt` turns, with
# `<image>` in the first human turn marking where the picture goes. Our records add a `task`
# and, per assistant turn, a `check`: what a correct answer must contain, for the judge.

# %%
import random

rng = random.Random(seed)
samples = {}
for task in TASK_TYPES:
    scene = next(s for s in scenes if task != "ocr" or s.word)
    samples[task] = make_task_sample(scene, task, rng)
    print(f"--- {task} (scene {scene.scene_id})")
    print(json.dumps(samples[task]["conversations"], indent=1, ensure_ascii=False))

# %% [markdown]
# ## The judge
#
# The judge parses a free-text answer and compares it with the scene. It reports whether
# the answer is correct for the question's check, and lists **hallucinations**: objects,
# colours, counts or words the answer claims that are not in the scene. Later it scores
# captions (3.1.3) and task accuracy (3.2), and it plays the human labeler of RLHF (3.3).

# %%
scene = scenes[0]
check = make_task_sample(scene, "counting", random.Random(1))
question, reference = check["conversations"][0]["value"], check["conversations"][1]["value"]
print("question: ", question.replace("<image>\n", ""))
for answer in [reference, "There are nine objects.",
               "I see a green star and a purple diamond.", ""]:
    verdict = judge_answer(scene, answer, check["checks"][0])
    print(f"{answer!r:48} correct={verdict.correct!s:5} hallucinations={verdict.hallucinations}")

# %% [markdown]
# Every reference answer the world generates must pass its own judge: over many scenes and
# all task types, the judge accepts the references and rejects nothing it should accept.

# %%
many = make_scenes(300, seed=seed + 1)
records = make_instruction_dataset(many, tasks=TASK_TYPES, samples_per_scene=1, seed=seed)
by_id = {s.scene_id: s for s in many}
correct = total = 0
for record in records:
    answers = [t["value"] for t in record["conversations"] if t["from"] == "gpt"]
    for answer, chk in zip(answers, record["checks"]):
        result = judge_answer(by_id[record["scene_id"]], answer, chk)
        correct += result.correct and not result.hallucinations
        total += 1
metrics["judge_reference_accuracy"] = correct / total
print(f"reference answers judged correct without hallucination: {correct}/{total}")

# %% [markdown]
# ## Writing and reading the LLaVA format
#
# A world data set exports to the LLaVA layout (a JSON file plus an image folder) and loads
# back identical. The loader validates every record and names the file, the record and the
# problem when something is wrong, for example a record whose image is given but whose first
# human turn has no `<image>`:

# %%
with tempfile.TemporaryDirectory() as tmp:
    folder = export_llava_dataset(many[:20], records[:20], Path(tmp) / "world")
    loaded, loaded_scenes = load_world_dataset(folder)
    print("round trip identical:", loaded == records[:20] and loaded_scenes == many[:20])
    broken = json.loads(json.dumps(records[:3]))
    broken[2]["conversations"][0]["value"] = "How many circles are there?"
    try:
        validate_llava_records(broken, path="data.json", image_folder=folder)
    except LlavaFormatError as error:
        print("LlavaFormatError:", error)

# %% [markdown]
# ## The tokenizer and the chat template
#
# The language models of this chapter read text through a byte-level BPE trained on the
# world's captions and dialogues (`tokenizers`), wrapped as a `transformers` tokenizer so it
# saves and loads with `save_pretrained` / `from_pretrained` like any checkpoint's. Its chat
# template lays a conversation out with role tokens, and marks the assistant's replies with
# `{% generation %}` blocks. `apply_chat_template(..., return_assistant_tokens_mask=True)`
# then returns a mask that is 1 exactly on the tokens the assistant says, including the
# end-of-turn token that teaches it to stop. Instruction tuning (3.2) puts the loss on those
# tokens only.

# %%
tokenizer = world_tokenizer(cache_dir, vocab_size=vocab_size, n_scenes=tokenizer_scenes, log=None)
metrics["tokenizer_vocab_size"] = len(tokenizer)
print(f"vocabulary: {len(tokenizer)} tokens; special: {tokenizer.all_special_tokens}")
print(tokenizer.apply_chat_template(
    [{"role": "user", "content": "<image>\nHow many circles are there?"},
     {"role": "assistant", "content": "There is one circle."}], tokenize=False))

# %%
from IPython.display import HTML

from companion.tokenizer import assistant_mask_html

encoded = encode_chat(tokenizer, samples["multi_turn"]["conversations"])
n_loss = sum(encoded["assistant_mask"])
print(f"{len(encoded['input_ids'])} tokens, {n_loss} carry loss (assistant replies + <|end|>)")
HTML(assistant_mask_html(tokenizer, encoded))

# %%
metrics["n_scenes"] = n_scenes
write_metrics("3.0", metrics, output_dir)
print(json.dumps(metrics, indent=1))
