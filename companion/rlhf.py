"""Section 3.3 end to end: the recipe that makes its preference data, reward model and
PPO policy, each cached (keyed by the recipe) so every 3.3 notebook can run alone.

- :func:`rlhf_prompts`: the training prompts (scenes of their own, split into the part the
  reward model and the policies train on and a held-out part for reward-model accuracy);
- :func:`preference_records`: sampled replies labelled by the judge (cached JSON);
- :func:`train_reward_model` / :func:`reward_model`: the Bradley-Terry reward model;
- :func:`ppo_policy`: the instruction-tuned model after PPO against that reward model;
- :func:`heldout_prompts`: single-turn prompts about 3.2's held-out scenes, for the final
  comparison;
- :func:`evaluate_policy` and :func:`versus_reference_model`: one row of that comparison, and
  each method's paired change from the SFT model with the issue's verdict.
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from companion.answers import evaluate_tasks
from companion.artifacts import cached_artifact
from companion.book import Book, chapter_parameters, load_book
from companion.clip import pixel_values_for
from companion.data.files import content_sha256
from companion.data.llava import open_image
from companion.evaluate import paired_difference, task_mean_difference, verdict
from companion.instruction import InstructionRecipe, instruction_tuned_vlm
from companion.instruction import recipe_from_parameters as instruction_recipe_from_parameters
from companion.llava import image_seq_length
from companion.lm import scene_as_text
from companion.ppo import PolicyWithValueHead, PPOConfig, sampled_kl, train_ppo
from companion.preference import (RewardModel, encode_preferences, judge_reply, label_preferences,
                                  load_preferences, preference_prompts, reward_model_loss,
                                  reward_trainable, sample_replies, save_preferences, score_replies)
from companion.stages import set_trainable
from companion.train import TrainConfig, train
from companion.vlm import load_vlm, save_vlm
from companion.world import make_instruction_dataset, make_scenes, render_scene


# the careless annotator's rate for 3.3's starting model (companion.world.careless_annotations)
MACHINE_WRITTEN = 1.0


@dataclass(frozen=True)
class RLHFRecipe:
    """Everything that decides section 3.3's artifacts (their cache keys)."""

    # the starting model: 3.2's recipe trained on machine-written data (every long-form
    # record carries one invented answer), whose learned hallucinations preference tuning
    # can remove; annotator_hallucination_rate=0 gives 3.2's own clean model
    sft: InstructionRecipe = field(
        default_factory=lambda: InstructionRecipe(annotator_hallucination_rate=MACHINE_WRITTEN))
    seed: int = 0
    scenes: int = 400               # scenes of the preference prompts (one prompt per task)
    heldout_fraction: float = 0.2   # share of those scenes kept out of every training set
    samples: int = 4                # replies sampled per prompt for the labeler to rank
    temperature: float = 1.0
    max_new_tokens: int = 32
    pairs: str = "all"              # "all" comparisons of the K replies, or "best_worst"
    noise: float = 0.0              # share of the labeler's choices flipped
    hallucination_penalty: float = 0.5
    rm_pooling: str = "likelihood"  # "likelihood" (the reply's log-prob: a generative RM),
                                    # "last" (the seed's head) or "mean" over reply tokens
    rm_steps: int = 200
    rm_lr: float = 1e-4
    rm_batch_size: int = 16         # pairs per step
    ppo_iterations: int = 60
    ppo_batch_size: int = 64
    ppo_lr: float = 5e-5
    ppo_kl_coef: float = 0.1        # initial beta (adaptive); 0 turns the penalty off
    ppo_score_norm: bool = True     # reward-model scores to unit scale by their running
                                    # moments before PPO (a likelihood reward is unbounded)
    sft_checkpoint: str = ""        # a LLaVA checkpoint (hub id or folder) as policy and
                                    # reference instead of 3.2's model (then ``sft`` is unused)
    preference_json: str = ""       # preference data (TRL fields) instead of sampled pairs: a
                                    # .json/.jsonl/.parquet file or a save_to_disk folder
    image_folder: str = ""          # where its image paths are resolved (default: the folder
                                    # that holds the file or dataset folder)
    rm_factual: bool | None = None  # the reward model also reads the image's ground truth in
                                    # words (LLaVA-RLHF's Fact-RLHF); needs the world's scenes.
                                    # None: True on the world's pairs, False on preference_json

    def __post_init__(self):
        if self.scenes < 5:
            raise ValueError(f"RLHFRecipe.scenes={self.scenes}: need at least 5 scenes")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction={self.heldout_fraction} must be in (0, 1)")
        if not 0 <= self.noise <= 1:
            raise ValueError(f"noise={self.noise} must be in [0, 1]")
        if self.rm_factual is None:  # the facts are there exactly when the world made the pairs
            object.__setattr__(self, "rm_factual", not self.preference_json)
        if self.rm_factual and self.preference_json:
            raise ValueError("rm_factual=True needs the world's scenes to state the facts; "
                             "preference_json records carry no ground truth (leave one unset)")

    def to_dict(self) -> dict:
        values = asdict(self)
        for name in ("sft_checkpoint", "preference_json", "image_folder", "rm_factual"):
            if not values[name]:  # keys of the world's own runs stay as they were
                del values[name]
        return values

    @property
    def image_root(self) -> Path | None:
        """The folder the preference file's images are read from (None: the world's own
        pairs, whose images are rendered)."""
        if not self.preference_json:
            return None
        return Path(self.image_folder) if self.image_folder else Path(self.preference_json).parent


def _sft_config(recipe: RLHFRecipe) -> dict:
    """What decides the starting model: 3.2's recipe, or the checkpoint named instead (by its
    name: a local folder rewritten in place keeps its key, so give a new one a new name)."""
    return {"checkpoint": recipe.sft_checkpoint} if recipe.sft_checkpoint else recipe.sft.to_dict()


def sft_model(cache_dir, recipe: RLHFRecipe, device="cpu", log=print):
    """The section's starting point ``(model, processor, tokenizer)``: the checkpoint that
    ``recipe.sft_checkpoint`` names, or 3.2's instruction-tuned model (cached or trained)."""
    if recipe.sft_checkpoint:
        model, processor, tokenizer = load_vlm(recipe.sft_checkpoint, device=device)
        return model.eval(), processor, tokenizer
    return instruction_tuned_vlm(cache_dir, recipe.sft, device, log)


def _data_config(recipe: RLHFRecipe) -> dict:
    if recipe.preference_json:  # keyed by its content, so an edited file is new data

        path = Path(recipe.preference_json)
        if not path.exists():
            raise FileNotFoundError(f"preference_json={str(path)!r}: no such file or folder; "
                                    "pass TRL-style preference data (prompt, chosen, rejected, "
                                    "images): a .json, .jsonl or .parquet file, or a folder "
                                    "written by Dataset.save_to_disk")
        return {"kind": "rlhf-preferences-file", "procedure": 1, "sft": _sft_config(recipe),
                "sha256": content_sha256(path),
                "image_folder": str(recipe.image_root.resolve()), "seed": recipe.seed,
                "heldout_fraction": recipe.heldout_fraction}
    keys = ("seed", "scenes", "samples", "temperature", "max_new_tokens", "pairs", "noise",
            "hallucination_penalty")
    return {"kind": "rlhf-preferences", "procedure": 1, "sft": _sft_config(recipe),
            **{k: getattr(recipe, k) for k in keys}}


def rlhf_prompts(recipe: RLHFRecipe, processor, image_size: int):
    """``(scenes_by_id, prompts, pixel_values, train_rows, heldout_rows)``."""
    scenes = make_scenes(recipe.scenes, seed=recipe.seed + 10, start_id=50_000_000)
    by_id = {s.scene_id: s for s in scenes}
    prompts = preference_prompts(scenes, seed=recipe.seed + 10)
    n_train = len(scenes) - max(1, round(recipe.heldout_fraction * len(scenes)))
    train_ids = {s.scene_id for s in scenes[:n_train]}
    pixels = pixel_values_for(processor, [render_scene(by_id[p["scene_id"]], image_size)
                                          for p in prompts])
    train_rows = [i for i, p in enumerate(prompts) if p["scene_id"] in train_ids]
    heldout_rows = [i for i, p in enumerate(prompts) if p["scene_id"] not in train_ids]
    return by_id, prompts, pixels, train_rows, heldout_rows


def make_preferences(recipe: RLHFRecipe, model, tokenizer, processor) -> list[dict]:
    """Sample ``recipe.samples`` replies per prompt from ``model`` and let the judge label
    them; every record says whether its scene is held out (``split``)."""
    by_id, prompts, pixels, train_rows, _ = rlhf_prompts(
        recipe, processor, model.config.vision_config.image_size)
    replies = sample_replies(model, tokenizer, prompts, pixels, recipe.samples,
                             recipe.temperature, recipe.max_new_tokens, seed=recipe.seed)
    train = set(train_rows)
    records = []
    for split in ("train", "heldout"):
        rows = [i for i in range(len(prompts)) if (i in train) == (split == "train")]
        labelled = label_preferences(
            [prompts[i] for i in rows], [replies[i] for i in rows], by_id,
            noise=recipe.noise if split == "train" else 0.0, seed=recipe.seed,
            hallucination_penalty=recipe.hallucination_penalty, pairs=recipe.pairs)
        records += [{**r, "split": split} for r in labelled]
    return records


def preference_records(cache_dir, recipe: RLHFRecipe | None = None, device="cpu",
                       log=print) -> list[dict]:
    """The labelled preference records of ``recipe`` (cached as JSON, TRL field names), or
    the records of ``recipe.preference_json`` with their splits (:func:`split_preferences`).

    ``preference_json`` may name a ``.json`` or ``.jsonl`` file, a ``.parquet`` file or a
    ``Dataset.save_to_disk`` folder, in TRL's standard or conversational form
    (:func:`companion.data.preference.read_preferences`); images given as PIL images (a
    dataset's ``Image`` feature) are written once to ``cache_dir/preference-images``, named
    by their content."""
    recipe = recipe or RLHFRecipe()
    if recipe.preference_json:
        records = load_preferences(recipe.preference_json,
                                   image_cache=Path(cache_dir) / "preference-images")
        return split_preferences(records, recipe.heldout_fraction, recipe.seed)

    def build(folder):
        model, processor, tokenizer = sft_model(cache_dir, recipe, device, log)
        save_preferences(folder / "preferences.json",
                         make_preferences(recipe, model, tokenizer, processor))

    folder = cached_artifact(cache_dir, "rlhf-preferences", _data_config(recipe), build, log=log)
    return load_preferences(folder / "preferences.json")


def split_preferences(records: list[dict], heldout_fraction: float, seed: int = 0) -> list[dict]:
    """Copies of ``records`` where each one without a ``split`` gets ``train`` or ``heldout``:
    a ``heldout_fraction`` of the distinct (prompt, image) questions, drawn with ``seed``, is
    held out, so no question is in both splits. A given ``split`` must be one of the two."""
    for index, record in enumerate(records):
        if record.get("split", "train") not in ("train", "heldout"):
            raise ValueError(f"preference record {index} ({record.get('id')!r}): split "
                             f"{record['split']!r}; expected 'train' or 'heldout'")
    questions = sorted({(r["prompt"], r["images"][0]) for r in records if "split" not in r})
    random.Random(seed).shuffle(questions)
    held = set(questions[:round(heldout_fraction * len(questions))])
    return [r if "split" in r else
            {**r, "split": "heldout" if (r["prompt"], r["images"][0]) in held else "train"}
            for r in records]


def preference_data(records, split: str, tokenizer, processor, model, scenes_by_id=None,
                    image_folder=None, factual: bool = False):
    """Encode the records of one split (``train`` or ``heldout``) for training or scoring.

    The images are the world's scenes rendered at the model's size (``scenes_by_id``), or,
    with ``image_folder``, files: each record's ``images[0]`` under that folder (a preference
    JSON of any origin). A record without a ``split`` counts as ``train``. ``factual``: each
    prompt also carries its scene in words, for the factual reward model (world records).
    """
    if scenes_by_id is None and image_folder is None:
        raise ValueError("preference_data needs scenes_by_id (world records) or image_folder "
                         "(records whose images are files)")
    size = model.config.vision_config.image_size
    chosen = [r for r in records if r.get("split", "train") == split]
    if not chosen:
        raise ValueError(f"no preference record in split {split!r}")
    if image_folder is not None:
        def load_image(record):
            return open_image(image_folder, record["images"][0],
                              f"preference record {record.get('id')!r}")
    else:
        def load_image(record):
            return render_scene(scenes_by_id[record["scene_id"]], size)
    facts = None
    if factual:
        if scenes_by_id is None:
            raise ValueError("factual=True needs scenes_by_id: the facts are the scenes' truth")
        facts = lambda record: scene_facts(scenes_by_id, [record["scene_id"]])[0]  # noqa: E731
    return encode_preferences(chosen, tokenizer, processor, image_seq_length(model), load_image,
                              facts=facts)

def train_reward_model(sft, data, pad_id: int, pooling: str = "mean", steps: int = 200,
                       lr: float = 3e-4, batch_size: int = 16, seed: int = 0, device="cpu",
                       log=None, offsets=None):
    """A :class:`RewardModel` started from a copy of ``sft`` (vision frozen), trained with
    Bradley-Terry on ``data``; ``offsets`` (chosen, rejected scores per pair) are a fixed
    baseline the rewards are taken relative to (:func:`reward_model_loss`). Returns
    ``(model, history)``."""
    if offsets is not None and not len(offsets[0]) == len(offsets[1]) == len(data):
        raise ValueError(f"offsets for {len(offsets[0])} and {len(offsets[1])} pairs; the "
                         f"data has {len(data)}: give one chosen and one rejected score per pair")

    torch.manual_seed(seed)
    model = RewardModel(copy.deepcopy(sft), pooling=pooling,
                        reads_facts=getattr(data, "factual", False)).to(device)
    reward_trainable(model)
    config = TrainConfig(steps=steps, lr=lr, weight_decay=0.0, warmup_fraction=0.1,
                         log_every=max(1, steps // 4) if log else 0)
    history = train(model, lambda batch: reward_model_loss(model, batch, offsets=offsets),
                    lambda step: data.draw(batch_size, step, seed, pad_id), config,
                    device=device, print_fn=log or (lambda _: None))
    return model, history


def _rm_config(recipe: RLHFRecipe) -> dict:
    factual = {"rm_factual": True} if recipe.rm_factual else {}  # old keys stay as they were
    return {"kind": "reward-model", "procedure": 1, "data": _data_config(recipe),
            **{k: getattr(recipe, k) for k in ("rm_pooling", "rm_steps", "rm_lr",
                                               "rm_batch_size")}, **factual}


def scene_facts(scenes_by_id: dict, scene_ids) -> list[str]:
    """What the factual reward model reads beside each image: its scene in words, the same
    sentence the LM read in place of images during its text-only pretraining."""
    return [scene_as_text(scenes_by_id[i]) for i in scene_ids]


def reward_model(cache_dir, recipe: RLHFRecipe | None = None, device="cpu", log=print):
    """``(reward_model, history_steps)`` of ``recipe``: from the cache or trained now."""
    recipe = recipe or RLHFRecipe()
    sft, processor, tokenizer = sft_model(cache_dir, recipe, device, log)

    def build(folder):
        records = preference_records(cache_dir, recipe, device, log)
        by_id = rlhf_prompts(recipe, processor, sft.config.vision_config.image_size)[0]
        data = preference_data(records, "train", tokenizer, processor, sft, by_id,
                               image_folder=recipe.image_root, factual=recipe.rm_factual)
        model, history = train_reward_model(
            sft, data, tokenizer.pad_token_id, recipe.rm_pooling, recipe.rm_steps,
            recipe.rm_lr, recipe.rm_batch_size, recipe.seed, device)
        torch.save(model.state_dict(), folder / "reward_model.pt")
        (folder / "history.json").write_text(json.dumps(history.steps))

    folder = cached_artifact(cache_dir, "reward-model", _rm_config(recipe), build, log=log)
    model = RewardModel(copy.deepcopy(sft), pooling=recipe.rm_pooling,
                        reads_facts=recipe.rm_factual).to(device)
    model.load_state_dict(torch.load(folder / "reward_model.pt", map_location=device,
                                     weights_only=True))
    return model.eval(), json.loads((folder / "history.json").read_text())


def ppo_config(recipe: RLHFRecipe, kl_coef: float | None = None):
    beta = recipe.ppo_kl_coef if kl_coef is None else kl_coef
    return PPOConfig(iterations=recipe.ppo_iterations, batch_size=recipe.ppo_batch_size,
                     lr=recipe.ppo_lr, init_kl_coef=beta, adaptive_kl=beta > 0,
                     max_new_tokens=recipe.max_new_tokens, temperature=recipe.temperature,
                     score_norm=recipe.ppo_score_norm, seed=recipe.seed)


def run_ppo(recipe: RLHFRecipe, sft, reward, tokenizer, processor, kl_coef: float | None = None,
            device="cpu", log=None):
    """PPO from a copy of ``sft`` against ``reward`` on the training prompts; the judge's
    verdicts on the rollouts are logged (``utility``, ``hallucinated``), never optimised.
    Returns ``(policy_vlm, history)``."""
    by_id, prompts, pixels, train_rows, _ = rlhf_prompts(
        recipe, processor, sft.config.vision_config.image_size)
    prompts = [prompts[i] for i in train_rows]
    pixels = pixels[train_rows]
    texts = [p["prompt"] for p in prompts]
    torch.manual_seed(recipe.seed)
    policy = PolicyWithValueHead(copy.deepcopy(sft)).to(device)
    set_trainable(policy.vlm, ("projector", "lm"))  # as in stage 2; the value head learns too

    def reward_fn(rows, replies):
        facts = (scene_facts(by_id, [prompts[r]["scene_id"] for r in rows])
                 if getattr(reward, "reads_facts", recipe.rm_factual) else None)
        return score_replies(reward, tokenizer, [texts[r] for r in rows], replies, pixels[rows],
                             facts=facts)

    def gold_fn(rows, replies):
        verdicts = [judge_reply(by_id[prompts[r]["scene_id"]], reply, prompts[r]["check"],
                                recipe.hallucination_penalty)
                    for r, reply in zip(rows, replies)]
        return {"utility": sum(v["utility"] for v in verdicts) / len(verdicts),
                "hallucinated": sum(v["hallucinated"] for v in verdicts) / len(verdicts)}

    history = train_ppo(policy, sft, tokenizer, texts, pixels, reward_fn,
                        ppo_config(recipe, kl_coef), gold_fn=gold_fn, log=log)
    return policy.vlm, history


def ppo_policy(cache_dir, recipe: RLHFRecipe | None = None, device="cpu", log=print):
    """``(policy_vlm, history_steps)``: the PPO policy of ``recipe``, cached."""
    recipe = recipe or RLHFRecipe()
    config = {"kind": "ppo-policy", "procedure": 1, "reward_model": _rm_config(recipe),
              "ppo": {k: v for k, v in recipe.to_dict().items()  # old keys stay as they were
                      if k.startswith("ppo_") and (k != "ppo_score_norm" or v)}}

    def build(folder):
        sft, processor, tokenizer = sft_model(cache_dir, recipe, device, log)
        reward, _ = reward_model(cache_dir, recipe, device, log)
        policy, history = run_ppo(recipe, sft, reward, tokenizer, processor, device=device)
        save_vlm(folder, policy, processor, tokenizer)
        (folder / "history.json").write_text(json.dumps(history.steps))

    folder = cached_artifact(cache_dir, "ppo-policy", config, build, log=log)
    policy, _, _ = load_vlm(folder, device=device)
    return policy.eval(), json.loads((folder / "history.json").read_text())


def heldout_prompts(recipe: RLHFRecipe, test_scenes: int, processor, image_size: int):
    """``(scenes_by_id, records, prompts, pixels)`` about 3.2's held-out scenes: the full
    records (for :func:`companion.instruction.evaluate_tasks`) and their first turns."""
    scenes = make_scenes(test_scenes, seed=recipe.sft.seed + 3, start_id=40_000_000)
    by_id = {s.scene_id: s for s in scenes}
    records = make_instruction_dataset(scenes, seed=recipe.sft.seed + 3)
    prompts = preference_prompts(scenes, seed=recipe.sft.seed + 3)
    pixels = pixel_values_for(processor, [render_scene(by_id[r["scene_id"]], image_size)
                                          for r in records])
    return by_id, records, prompts, pixels


def with_sft(recipe: RLHFRecipe, **changes) -> RLHFRecipe:
    """``recipe`` with fields of its instruction-tuning recipe changed."""
    return replace(recipe, sft=replace(recipe.sft, **changes))


def evaluate_answers(model, tokenizer, heldout, max_new_tokens: int = 48):
    """The judged greedy answers of ``model`` on :func:`heldout_prompts`' records, every
    record played as a chat as in 3.2 (a :class:`~companion.instruction.TaskScores`)."""
    by_id, records, _, pixels = heldout
    return evaluate_tasks(model, tokenizer, records, by_id, pixels, max_new_tokens=max_new_tokens)


def evaluate_policy(model, reference, reward, tokenizer, heldout, max_new_tokens: int = 48,
                    kl_samples: int = 2, seed: int = 0,
                    factual: bool | None = None) -> tuple[dict, object]:
    """One row of the section's comparison, on the held-out scenes of 3.2, and the judged
    answers behind it ``(row, scores)``:

    - ``mean_task_accuracy`` and ``hallucination_rate``: every record played as a chat
      (greedy answers) and judged, as in 3.2;
    - ``reward``: the reward model's mean score of the greedy first answers (``factual``:
      give it each scene's facts; by default, when the reward model reads them);
    - ``kl``: KL(model || reference) per reply, estimated on sampled replies.

    ``scores`` (a :class:`~companion.instruction.TaskScores`) lets two rows be compared
    answer by answer (:func:`companion.evaluate.paired_difference`).
    """
    by_id, _, prompts, pixels = heldout
    scores = evaluate_answers(model, tokenizer, heldout, max_new_tokens)
    first = {a["id"]: a["answer"] for a in scores.answers if a["turn"] == 0}
    texts = [p["prompt"] for p in prompts]
    if factual is None:
        factual = getattr(reward, "reads_facts", False)
    facts = scene_facts(by_id, [p["scene_id"] for p in prompts]) if factual else None
    rewards = score_replies(reward, tokenizer, texts, [first[p["id"]] for p in prompts], pixels,
                            facts=facts)
    kl = sampled_kl(model, reference, tokenizer, texts, pixels, max_new_tokens,
                    samples=kl_samples, seed=seed)
    row = {"mean_task_accuracy": scores.mean_task_accuracy(), "accuracy": scores.accuracy(),
           "hallucination_rate": scores.hallucination_rate(),
           "reward": float(rewards.mean()), "kl": kl,
           "by_task": {t: round(v["accuracy"], 4) for t, v in scores.by_task().items()}}
    return row, scores


# every verdict versus_reference_model can write (the notebooks' nbval masking reads them
# as trained figures: a seed or another CPU can flip one)
RLHF_VERDICTS = ("helped",
                 "fewer hallucinations, but task accuracy fell by more than {max_accuracy_loss}",
                 "did not help: more hallucinations",
                 "did not help: no clear change in hallucination (within 2 se)")


def versus_reference_model(scores: dict, base: str, max_accuracy_loss: float = 0.02
                           ) -> dict[str, dict]:
    """Each run of ``scores`` (name -> :class:`~companion.instruction.TaskScores` on the same
    held-out records) against the run named ``base``, answer by answer.

    Returns, per run: ``accuracy_change`` and ``accuracy_se`` (mean task accuracy, see
    :func:`companion.evaluate.task_mean_difference`), ``hallucination_change`` and
    ``hallucination_se`` (:func:`companion.evaluate.paired_difference`) and a ``verdict`` on
    the section's bar: a method *helped* when the hallucination rate fell by more than two
    standard errors and mean task accuracy fell by at most ``max_accuracy_loss``. A fall
    inside two standard errors is reported as no clear effect, not as help.
    """
    if base not in scores:
        raise ValueError(f"versus_reference_model: no run named {base!r} among {list(scores)}")
    out = {}
    for name, run in scores.items():
        if name == base:
            continue
        accuracy = task_mean_difference(scores[base], run)
        hallucination = paired_difference(scores[base], run, "hallucinated")
        change = verdict(hallucination["difference"], hallucination["se"],
                         higher_is_better=False)
        if change == "helped" and accuracy["difference"] >= -max_accuracy_loss:
            word = RLHF_VERDICTS[0]
        elif change == "helped":
            word = RLHF_VERDICTS[1].format(max_accuracy_loss=max_accuracy_loss)
        elif change == "hurt":
            word = RLHF_VERDICTS[2]
        else:
            word = RLHF_VERDICTS[3]
        out[name] = {"accuracy_change": accuracy["difference"], "accuracy_se": accuracy["se"],
                     "hallucination_change": hallucination["difference"],
                     "hallucination_se": hallucination["se"], "verdict": word}
    return out


def headline_changes(method: str, change: dict, base_hallucination_rate: float) -> dict:
    """The flat metrics keys that 3.5 and the README quote for one method against SFT
    (``change``: a row of :func:`versus_reference_model`): ``<method>_hallucination_change``
    and its ``_se``, the change relative to the SFT rate (``_relative_change``: −0.3 is 30%
    fewer hallucinations) and ``<method>_task_accuracy_change``."""
    relative = (change["hallucination_change"] / base_hallucination_rate
                if base_hallucination_rate > 0 else None)
    return {f"{method}_hallucination_change": change["hallucination_change"],
            f"{method}_hallucination_change_se": change["hallucination_se"],
            f"{method}_hallucination_relative_change": relative,
            f"{method}_task_accuracy_change": change["accuracy_change"]}


# parameter name in the 3.3 notebooks -> the field of the starting model's recipe it sets
_SFT_PARAMETERS = {
    "seed": "seed", "tokenizer_scenes": "tokenizer_scenes",
    "clip_train_scenes": "clip_train_scenes", "clip_steps": "clip_steps",
    "clip_batch_size": "clip_batch_size", "lm_scenes": "lm_scenes", "lm_steps": "lm_steps",
    "sft_train_scenes": "train_scenes", "sft_stage1_steps": "stage1_steps",
    "sft_stage2_steps": "stage2_steps", "sft_batch_size": "batch_size",
    "sft_merge_patches": "merge_patches",
    "annotator_hallucination_rate": "annotator_hallucination_rate",
}
# parameter name in the 3.3 notebooks -> the field of RLHFRecipe it sets
_RLHF_PARAMETERS = {
    "seed": "seed", "preference_scenes": "scenes", "samples": "samples",
    "max_new_tokens": "max_new_tokens", "pairs": "pairs", "rm_steps": "rm_steps",
    "rm_lr": "rm_lr", "ppo_iterations": "ppo_iterations", "ppo_batch_size": "ppo_batch_size",
    "ppo_lr": "ppo_lr", "ppo_kl_coef": "ppo_kl_coef", "sft_checkpoint": "sft_checkpoint",
    "preference_json": "preference_json", "image_folder": "image_folder",
    "rm_factual": "rm_factual", "rm_pooling": "rm_pooling", "ppo_score_norm": "ppo_score_norm",
}


def recipe_from_parameters(parameters: dict) -> RLHFRecipe:
    """The section's recipe from parameters named as in the 3.3 notebooks (``sft_*`` for
    3.2's; names not given keep the defaults, other names are ignored). The starting model's
    part goes through 3.2's own :func:`companion.instruction.recipe_from_parameters`. The
    notebooks build theirs with :func:`notebook_recipe`, which names the upstream models by
    a profile instead of restating their recipe."""
    sft = instruction_recipe_from_parameters(parameters, _SFT_PARAMETERS, base=RLHFRecipe().sft)
    return RLHFRecipe(sft=sft, **{field_name: parameters[name]
                                  for name, field_name in _RLHF_PARAMETERS.items()
                                  if name in parameters})


# each 3.3 chapter -> the chapters whose models it starts from (3.2's first)
UPSTREAM_CHAPTERS = {"3.3.1": ("3.2",), "3.3.2": ("3.2", "3.3.1"),
                     "3.3.3": ("3.2", "3.3.1", "3.3.2")}


def notebook_recipe(chapter_id: str, parameters: dict, book: Book | None = None) -> RLHFRecipe:
    """The recipe a 3.3 notebook runs, from its parameters (its ``globals()``).

    The models it starts from were made by the chapters upstream of it
    (:data:`UPSTREAM_CHAPTERS`), with the parameters ``book.toml``'s profile
    ``parameters["upstream"]`` gives them (default ``"default"``: the notebooks' own values),
    changed by ``parameters["upstream_changes"]`` (``{name: value}``, as ``-p`` options; the
    runner passes its profile and ``-p`` options there). 3.2's parameters make the starting
    model's recipe; each 3.3 chapter's, then the notebook's own, set the rest by name
    (:func:`recipe_from_parameters`; the starting model's seed stays 3.2's). So a notebook's
    parameters cell holds only what it decides, and it finds what the chapters before it
    cached under the same profile."""
    if chapter_id not in UPSTREAM_CHAPTERS:
        raise ValueError(f"notebook_recipe: chapter {chapter_id!r} is not a 3.3 chapter; "
                         f"expected one of {', '.join(UPSTREAM_CHAPTERS)}")
    book = book if book is not None else load_book()
    profile = parameters.get("upstream") or "default"
    changes = parameters.get("upstream_changes") or {}
    upstream = {chapter: chapter_parameters(book, chapter, profile, changes)
                for chapter in UPSTREAM_CHAPTERS[chapter_id]}
    named = {}
    for chapter in UPSTREAM_CHAPTERS[chapter_id][1:]:
        named.update(upstream[chapter])
    named.update(parameters)
    sft = instruction_recipe_from_parameters(upstream["3.2"], base=RLHFRecipe().sft)
    sft_names = {k: v for k, v in _SFT_PARAMETERS.items() if k != "seed"}
    sft = instruction_recipe_from_parameters(named, sft_names, base=sft)
    return RLHFRecipe(sft=sft, **{field_name: named[name]
                                  for name, field_name in _RLHF_PARAMETERS.items()
                                  if name in named})
