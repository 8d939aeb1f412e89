"""The text-only LM's recipe: loss on the replies only, several questions per conversation,
evidence-first answers, its cache key, and its held-out curve measured while it trains."""

import re
from dataclasses import asdict

import pytest

from companion.batching import IGNORE_INDEX
from companion.tokenizer import END_OF_TURN, encode_chat, train_tokenizer, world_corpus
from companion.lm import (SCENE_PREFIX, LMRecipe, TinyLMConfig, lm_corpus, lm_reply_labels,
                          lm_training_examples, scene_as_text)

TINY = dict(scenes=12, sizes=TinyLMConfig(hidden_size=32, layers=1, heads=2,
                                          intermediate_size=64))


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(world_corpus(40, seed=1), vocab_size=400)


def test_reply_labels_keep_exactly_the_assistant_replies_and_their_end_of_turn(tokenizer):
    turns = [{"from": "human",
              "value": "Scene: a small red circle at the top.\nCount the circles."},
             {"from": "gpt", "value": "There is one circle."},
             {"from": "human", "value": "What colour is the circle?"},
             {"from": "gpt", "value": "The circle is red."}]
    chat = encode_chat(tokenizer, turns)
    labels = lm_reply_labels(chat)
    assert len(labels) == len(chat["input_ids"])
    kept = [token for token in labels if token != IGNORE_INDEX]
    assert tokenizer.decode(kept, skip_special_tokens=False).replace(" ", "") == (
        f"There is one circle.{END_OF_TURN}The circle is red.{END_OF_TURN}".replace(" ", ""))
    # independent of the mask's own layout: every kept position holds its input token
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(labels, chat["input_ids"]))
    scene = tokenizer.encode("Scene: a small red circle", add_special_tokens=False)
    start = next(i for i in range(len(labels)) if chat["input_ids"][i:i + len(scene)] == scene)
    assert all(label == IGNORE_INDEX for label in labels[start:start + len(scene)])


def test_loss_on_replies_masks_the_scene_and_questions_and_all_keeps_every_token(tokenizer):
    plain = lm_training_examples(LMRecipe(loss_on="all", **TINY), tokenizer)
    replies = lm_training_examples(LMRecipe(**TINY), tokenizer)  # the default: replies
    assert [e["input_ids"] for e in plain] == [e["input_ids"] for e in replies]
    assert all(e["labels"] == e["input_ids"] for e in plain)
    for example in replies:
        kept = sum(label != IGNORE_INDEX for label in example["labels"])
        assert 0 < kept < len(example["input_ids"]) // 2


def test_several_questions_share_one_conversation_that_describes_the_scene_once(tokenizer):
    single = lm_corpus(12, seed=0)
    merged = lm_corpus(12, seed=0, questions_per_conversation=6)
    assert len(merged) == 12  # at most six records per scene: one conversation each
    assert sum(len(c) for c in merged) == sum(len(c) for c in single)
    for conversation in merged:
        assert sum(turn["value"].count(SCENE_PREFIX) for turn in conversation) == 1
    with pytest.raises(ValueError, match=r"more than max_length=40; raise LMRecipe.max_length"):
        lm_training_examples(LMRecipe(questions_per_conversation=6, max_length=40, **TINY),
                             tokenizer)


def test_evidence_first_reaches_the_lms_corpus():
    plain = [t["value"] for c in lm_corpus(30, seed=0) for t in c]
    evidence = [t["value"] for c in lm_corpus(30, seed=0, answer_style="evidence_first")
                for t in c]
    changed = [(a, b) for a, b in zip(plain, evidence) if a != b]
    assert changed and all(b.endswith((", so yes.", ", so no.")) for _, b in changed)


def test_the_scene_in_words_can_carry_the_boxes_a_grounding_answer_copies():
    from companion.world import judge_answer, make_instruction_dataset, make_scenes

    scenes = make_scenes(20, seed=2)
    by_id = {s.scene_id: s for s in scenes}
    records = [r for r in make_instruction_dataset(scenes, seed=2) if r["task"] == "grounding"]
    checked = 0
    for record in records:
        scene = by_id[record["scene_id"]]
        text = scene_as_text(scene, boxes=True)
        # the same sentence as without boxes, each object followed by its box
        assert re.sub(r" in box \[[^\]]*\]", "", text) == scene_as_text(scene)
        assert text.count(" in box [") == len(scene.objects)
        check = record["checks"][0]
        if check["kind"] != "ground":
            continue
        # the box the answer must give is written in the scene's words
        box = "[" + ", ".join(f"{v:.2f}" for v in check["bbox"]) + "]"
        assert box in text and box not in scene_as_text(scene)
        assert judge_answer(scene, record["conversations"][1]["value"], check).passed
        checked += 1
    assert checked > 5
    corpus = lm_corpus(5, seed=0, boxes=True)
    assert all(" in box [" in c[0]["value"] for c in corpus)
    assert LMRecipe(scene_boxes=True).to_dict()["scene_boxes"] is True


def test_the_default_recipe_is_the_measured_one_and_every_field_is_in_its_cache_key():
    """The defaults are the recipe benchmarks/lm_told_in_words.py measured best for its
    cost (README, Benchmarks); a field left out of the key would let two recipes share one
    cached LM."""
    recipe = LMRecipe()
    assert recipe.to_dict() == {
        "seed": 0, "tokenizer_scenes": 2000, "scenes": 20000, "steps": 2000, "batch_size": 32,
        "lr": 3e-3, "sizes": asdict(TinyLMConfig()), "max_length": 512, "loss_on": "replies",
        "questions_per_conversation": 6, "answer_style": "evidence_first",
        "scene_boxes": False}
    for change in ({"loss_on": "all"}, {"questions_per_conversation": 1},
                   {"answer_style": "verdict_first"}, {"scene_boxes": True}):
        assert LMRecipe(**change).to_dict() == {**recipe.to_dict(), **change}


@pytest.mark.parametrize("bad, message", [
    ({"loss_on": "prompts"}, "loss_on='prompts'"),
    ({"questions_per_conversation": 0}, "questions_per_conversation=0 must be at least 1"),
    ({"answer_style": "chatty"}, "answer_style='chatty'"),
    ({"max_length": 1024}, "max_length=1024 exceeds the LM's max_positions=512"),
])
def test_impossible_lm_recipes_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        LMRecipe(**bad)


def test_the_lm_is_measured_part_way_and_its_curve_is_cached_with_it(tokenizer, tmp_path,
                                                                      monkeypatch):
    import companion.lm as lm_module
    from companion.answers import evaluate_tasks
    from companion.world import TASK_TYPES, make_scenes

    monkeypatch.setattr(lm_module, "LM_CURVE_STEPS", (2, 4, 9))  # 9: past the end, left out
    monkeypatch.setattr(lm_module, "LM_CURVE_SCENES", 2)
    recipe = LMRecipe(steps=6, batch_size=2, **TINY)
    model, history, curve = lm_module.pretrained_lm(tmp_path, tokenizer, recipe, log=None,
                                              with_curve=True)
    assert [point["step"] for point in curve] == [2, 4, 6]
    assert [point["tokens"] for point in curve] == pytest.approx(  # (each rounded)
        [curve[0]["tokens"] * k for k in (1, 2, 3)], abs=2)
    assert all(point["by_task"] and set(point["by_task"]) <= set(TASK_TYPES) for point in curve)
    # the last point measured the model that was saved: the loaded one scores the same
    records, by_id = lm_module.told_in_words(make_scenes(2, seed=3, start_id=40_000_000), 3)
    scores = evaluate_tasks(model, tokenizer, records, by_id, None,
                            max_new_tokens=lm_module.LM_CURVE_MAX_NEW_TOKENS)
    assert scores.mean_task_accuracy() == curve[-1]["mean_task_accuracy"]
    assert len(history) == 6
    monkeypatch.setattr(lm_module, "pretrain_lm_with_curve", None)  # a second call must not train
    again = lm_module.pretrained_lm(tmp_path, tokenizer, recipe, log=None, with_curve=True)
    assert again[2] == curve
