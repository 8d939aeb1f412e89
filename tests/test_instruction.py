"""Instruction tuning: labels token by token, truncation, freeze policies, the VLM."""

import warnings
from dataclasses import replace

import pytest
import torch

from companion.answers import evaluate_tasks, generate_replies, generate_tokens
from companion.batching import IGNORE_INDEX, pad_examples
from companion.instruction import (LlavaCollator, NoTargetError, build_example, encode_records,
                                   instruction_tuning_step)
from companion.models import TinyClipConfig, build_clip
from companion.stages import apply_stage, part_of, set_trainable, trainable_summary
from companion.tokenizer import ASSISTANT, END_OF_TURN, USER, world_corpus, train_tokenizer
from companion.train import TrainConfig, train
from companion.llava import image_seq_length
from companion.lm import TinyLMConfig, build_lm, text_only_conversations
from companion.tokenizer import end_of_turn_id, image_token_id
from companion.vlm import build_vlm, load_vlm, save_vlm
from companion.world import make_instruction_dataset, make_scenes, render_scene

CLIP_SIZES = TinyClipConfig(image_size=16, patch_size=8, vision_width=32, vision_layers=1,
                            text_width=32, text_layers=1, heads=2, projection_dim=16)
LM_SIZES = TinyLMConfig(hidden_size=32, layers=1, heads=2, intermediate_size=64)
N_IMAGE = 4  # (16 / 8) ** 2 patches

SINGLE = [{"from": "human", "value": "<image>\nHow many circles are there?"},
          {"from": "gpt", "value": "There is one circle."}]
MULTI = SINGLE + [{"from": "human", "value": "Where is it?"},
                  {"from": "gpt", "value": "It is at the top left."}]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(world_corpus(40, seed=1), vocab_size=400)


@pytest.fixture(scope="module")
def vlm(tokenizer):
    clip, processor, _ = build_clip(tokenizer, sizes=CLIP_SIZES, seed=0)
    lm, _ = build_lm(tokenizer, sizes=LM_SIZES, seed=0)
    return build_vlm(clip, lm, tokenizer), processor


def _segments(tokenizer, conversations):
    """Independent reference: the token ids of each template piece, and whether it is loss."""
    pieces = []
    for turn in conversations:
        if turn["from"] == "human":
            text = turn["value"]
            pieces.append((tokenizer.encode(USER + "\n", add_special_tokens=False), False))
            if text.startswith("<image>\n"):
                pieces.append(([image_token_id(tokenizer)] * N_IMAGE, False))
                pieces.append((tokenizer.encode("\n", add_special_tokens=False), False))
                text = text[len("<image>\n"):]
            pieces.append((tokenizer.encode(text + END_OF_TURN + "\n", add_special_tokens=False),
                           False))
        else:
            pieces.append((tokenizer.encode(ASSISTANT + "\n", add_special_tokens=False), False))
            pieces.append((tokenizer.encode(turn["value"] + END_OF_TURN, add_special_tokens=False),
                           True))
            pieces.append((tokenizer.encode("\n", add_special_tokens=False), False))
    ids = [t for piece, _ in pieces for t in piece]
    labels = [t if loss else IGNORE_INDEX for piece, loss in pieces for t in piece]
    return ids, labels


@pytest.mark.parametrize("conversation", [SINGLE, MULTI], ids=["single-turn", "multi-turn"])
def test_labels_token_by_token(tokenizer, conversation):
    example = build_example(tokenizer, conversation, N_IMAGE, image_token_id(tokenizer))
    ids, labels = _segments(tokenizer, conversation)
    assert example["input_ids"] == ids
    assert example["labels"] == labels
    # read back: the loss tokens are exactly the assistant replies and their end-of-turn
    kept = [t for t in example["labels"] if t != IGNORE_INDEX]
    replies = [t["value"] for t in conversation if t["from"] == "gpt"]
    assert tokenizer.decode(kept) == "".join(r + END_OF_TURN for r in replies)
    assert kept.count(end_of_turn_id(tokenizer)) == len(replies)


def test_image_tokens_human_turns_and_template_are_ignored(tokenizer):
    example = build_example(tokenizer, MULTI, N_IMAGE, image_token_id(tokenizer))
    image = image_token_id(tokenizer)
    assert example["input_ids"].count(image) == N_IMAGE
    for token, label in zip(example["input_ids"], example["labels"]):
        if token in (image, tokenizer.convert_tokens_to_ids(USER),
                     tokenizer.convert_tokens_to_ids(ASSISTANT)):
            assert label == IGNORE_INDEX
    question = tokenizer.encode("How many circles are there?", add_special_tokens=False)
    start = next(i for i in range(len(example["input_ids"]))
                 if example["input_ids"][i:i + len(question)] == question)
    assert all(label == IGNORE_INDEX for label in example["labels"][start:start + len(question)])


def test_truncation_cuts_from_the_right_and_keeps_the_image(tokenizer):
    full = build_example(tokenizer, MULTI, N_IMAGE, image_token_id(tokenizer))
    cut = build_example(tokenizer, MULTI, N_IMAGE, image_token_id(tokenizer),
                        max_length=len(full["input_ids"]) - 3)
    assert cut["input_ids"] == full["input_ids"][:-3]
    assert cut["labels"] == full["labels"][:-3]


def test_truncation_that_would_cut_image_tokens_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="would cut the image"):
        build_example(tokenizer, SINGLE, N_IMAGE, image_token_id(tokenizer), max_length=4)


def test_sample_left_without_assistant_tokens_is_reported(tokenizer):
    full = build_example(tokenizer, SINGLE, N_IMAGE, image_token_id(tokenizer))
    first_label = next(i for i, label in enumerate(full["labels"]) if label != IGNORE_INDEX)
    with pytest.raises(NoTargetError, match="record 'x'.*max_length"):
        build_example(tokenizer, SINGLE, N_IMAGE, image_token_id(tokenizer),
                      max_length=first_label, where="record 'x'")
    with pytest.raises(NoTargetError, match="no assistant reply"):
        build_example(tokenizer, SINGLE[:1], N_IMAGE, image_token_id(tokenizer))


def test_two_images_in_one_conversation_is_an_error(tokenizer):
    two = [{"from": "human", "value": "<image>\n<image>\nSame?"}, {"from": "gpt", "value": "Yes."}]
    with pytest.raises(ValueError, match="2 <image> tokens"):
        build_example(tokenizer, two, N_IMAGE, image_token_id(tokenizer))


def test_collator_pads_masks_and_skips(tokenizer, vlm):
    model, processor = vlm
    scenes = make_scenes(3, seed=4)
    records = [{"id": f"r{i}", "conversations": conv, "scene_id": scenes[i].scene_id}
               for i, conv in enumerate([SINGLE, MULTI, SINGLE[:1]])]
    by_id = {s.scene_id: s for s in scenes}
    collate = LlavaCollator(tokenizer, processor, N_IMAGE,
                            load_image=lambda r: render_scene(by_id[r["scene_id"]], 16))
    with pytest.warns(UserWarning, match="record 'r2'"):
        batch = collate(records)
    assert [s[0] for s in collate.skipped] == ["r2"]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 2 and batch["pixel_values"].shape == (2, 3, 16, 16)
    short = len(build_example(tokenizer, SINGLE, N_IMAGE, image_token_id(tokenizer))["input_ids"])
    assert batch["attention_mask"][0].sum() == short
    assert (batch["input_ids"][0, short:] == tokenizer.pad_token_id).all()
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all()
    with pytest.raises(NoTargetError, match="every record"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            collate(records[2:])


def test_instruction_step_loss_is_the_assistant_only_cross_entropy(tokenizer, vlm):
    model, processor = vlm
    scene = make_scenes(1, seed=4)[0]
    collate = LlavaCollator(tokenizer, processor, N_IMAGE,
                            load_image=lambda r: render_scene(scene, 16))
    batch = collate([{"id": "a", "conversations": MULTI}])
    loss = instruction_tuning_step(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=batch["pixel_values"]).logits.double()
    labels = batch["labels"][0, 1:]
    keep = labels != IGNORE_INDEX
    reference = torch.nn.functional.cross_entropy(logits[0, :-1][keep], labels[keep])
    assert torch.allclose(loss.double(), reference, atol=1e-5)


def test_freeze_policies_are_bit_exact(tokenizer, vlm):
    model, processor = vlm
    scenes = make_scenes(8, seed=6)
    by_id = {s.scene_id: s for s in scenes}
    data = encode_records(make_instruction_dataset(scenes, seed=0), tokenizer, processor, N_IMAGE,
                          lambda r: render_scene(by_id[r["scene_id"]], 16))
    for stage, trained in (("stage1", {"projector"}), ("stage2", {"projector", "lm"})):
        counts = apply_stage(model, stage)
        assert {p for p, n in counts.items() if n} == trained
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        train(model, lambda b: instruction_tuning_step(model, b),
              lambda s: data.batch(4, s, pad_id=tokenizer.pad_token_id),
              TrainConfig(steps=2, lr=1e-2, log_every=0), device="cpu")
        for name, parameter in model.named_parameters():
            same = torch.equal(parameter, before[name])
            if part_of(name) in trained and parameter.requires_grad:
                continue
            assert same, f"{stage}: frozen {name} changed"
        changed = {part_of(n) for n, p in model.named_parameters()
                   if not torch.equal(p, before[n])}
        assert changed == trained, stage
        summary = trainable_summary(model)
        assert summary["vision"][0] == 0 and summary["projector"][0] == summary["projector"][1]


def test_unknown_stage_and_part_are_errors(vlm):
    model, _ = vlm
    with pytest.raises(ValueError, match="unknown stage"):
        apply_stage(model, "stage3")
    with pytest.raises(ValueError, match="unknown part"):
        set_trainable(model, ["decoder"])
    with pytest.raises(ValueError, match="belongs to no known part"):
        part_of("encoder.layer.0.weight")


def test_vlm_reuses_the_trained_parts(tokenizer):
    clip, _, _ = build_clip(tokenizer, sizes=CLIP_SIZES, seed=1)
    lm, _ = build_lm(tokenizer, sizes=LM_SIZES, seed=2)
    model = build_vlm(clip, lm, tokenizer)
    assert torch.equal(model.model.vision_tower.embeddings.patch_embedding.weight,
                       clip.vision_model.embeddings.patch_embedding.weight)
    assert torch.equal(model.model.language_model.embed_tokens.weight, lm.model.embed_tokens.weight)
    assert torch.equal(model.lm_head.weight, lm.lm_head.weight)
    assert image_seq_length(model) == N_IMAGE
    assert model.config.image_token_index == image_token_id(tokenizer)


def test_vlm_round_trips_through_a_saved_checkpoint(tmp_path, tokenizer, vlm):
    model, processor = vlm
    save_vlm(tmp_path / "tiny-llava", model, processor, tokenizer)
    loaded, loaded_processor, loaded_tokenizer = load_vlm(str(tmp_path / "tiny-llava"))
    scene = make_scenes(1, seed=9)[0]
    pixels = loaded_processor(images=[render_scene(scene, 16)], return_tensors="pt")["pixel_values"]
    conversation = [SINGLE[:1]]
    assert (generate_replies(model, tokenizer, conversation, pixels, max_new_tokens=5)
            == generate_replies(loaded, loaded_tokenizer, conversation, pixels, max_new_tokens=5))


def test_batched_generation_matches_one_by_one(tokenizer, vlm):
    """Left padding must not change greedy answers."""
    model, processor = vlm
    scenes = make_scenes(3, seed=11)
    pixels = processor(images=[render_scene(s, 16) for s in scenes],
                       return_tensors="pt")["pixel_values"]
    conversations = [SINGLE[:1], MULTI[:3], [{"from": "human", "value": "<image>\nDescribe."}]]
    together = generate_replies(model, tokenizer, conversations, pixels, max_new_tokens=6)
    alone = [generate_replies(model, tokenizer, [c], pixels[i:i + 1], max_new_tokens=6)[0]
             for i, c in enumerate(conversations)]
    assert together == alone


def test_evaluate_tasks_judges_every_turn(tokenizer, vlm):
    model, processor = vlm
    scenes = make_scenes(2, seed=12)
    by_id = {s.scene_id: s for s in scenes}
    records = make_instruction_dataset(scenes, tasks=["counting", "multi_turn"], seed=0)
    pixels = processor(images=[render_scene(by_id[r["scene_id"]], 16) for r in records],
                       return_tensors="pt")["pixel_values"]
    scores = evaluate_tasks(model, tokenizer, records, by_id, pixels, max_new_tokens=4)
    assert len(scores.answers) == sum(len(r["checks"]) for r in records)
    assert set(scores.by_task()) == {"counting", "multi_turn"}
    assert 0.0 <= scores.mean_task_accuracy() <= 1.0


def test_a_text_only_lm_is_scored_on_the_scene_in_words(tokenizer, vlm):
    """pixel_values=None: the text-pretrained LM answers with the scene written out, and
    its replies are the greedy continuation of exactly those prompt tokens."""
    from companion.answers import prompt_ids

    lm, _ = build_lm(tokenizer, sizes=LM_SIZES, seed=0)
    scenes = make_scenes(2, seed=12)
    by_id = {s.scene_id: s for s in scenes}
    records = make_instruction_dataset(scenes, tasks=["counting", "multi_turn"], seed=0)
    text = [{**r, "conversations": c}
            for r, c in zip(records, text_only_conversations(records, by_id))]
    scores = evaluate_tasks(lm, tokenizer, text, by_id, None, max_new_tokens=4)
    assert len(scores.answers) == sum(len(r["checks"]) for r in records)
    conversation = text[0]["conversations"][:1]
    prompts, replies = generate_tokens(lm, tokenizer, [conversation], None, max_new_tokens=3)
    ids = torch.tensor([prompt_ids(tokenizer, conversation, 0)])
    assert prompts[0] == ids[0].tolist()
    with torch.no_grad():
        for _ in range(3):
            logits = lm(input_ids=ids).logits[:, -1]
            logits[:, image_token_id(tokenizer)] = float("-inf")  # never generated
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    greedy = ids[0, -3:].tolist()
    end = end_of_turn_id(tokenizer)
    assert replies[0] == (greedy[:greedy.index(end) + 1] if end in greedy else greedy)
    with pytest.raises(ValueError, match="no pixel_values"):
        generate_replies(lm, tokenizer, [SINGLE[:1]], None)


def test_text_only_conversations_replace_the_image_by_its_description():
    scenes = make_scenes(2, seed=13)
    records = make_instruction_dataset(scenes, tasks=["counting"], seed=0)
    texts = text_only_conversations(records, {s.scene_id: s for s in scenes})
    assert all("<image>" not in turn["value"] for conv in texts for turn in conv)
    assert texts[0][0]["value"].startswith("Scene: ")
    assert records[0]["conversations"][0]["value"].startswith("<image>")  # input untouched


def test_pad_examples_left_and_errors():
    batch = pad_examples([{"input_ids": [5, 6]}, {"input_ids": [7]}], pad_id=0, side="left")
    assert batch["input_ids"].tolist() == [[5, 6], [0, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1], [0, 1]]
    with pytest.raises(ValueError, match="no examples"):
        pad_examples([], 0)


def test_text_pretrained_lm_is_cached_and_learns(tmp_path, tokenizer):
    from companion.lm import LMRecipe, pretrained_lm

    recipe = LMRecipe(scenes=20, steps=15, batch_size=4, lr=3e-3, sizes=LM_SIZES)
    messages = []
    lm, history = pretrained_lm(tmp_path, tokenizer, recipe, log=messages.append)
    assert history[-1]["loss"] < history[0]["loss"]
    again, _ = pretrained_lm(tmp_path, tokenizer, recipe, log=messages.append)
    assert [m.split()[0] for m in messages] == ["building", "loaded"]
    for (name, a), (_, b) in zip(lm.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_lm_checkpoint_path_loads_a_saved_lm(tmp_path, tokenizer):
    lm, _ = build_lm(tokenizer, sizes=LM_SIZES, seed=3)
    lm.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    loaded, loaded_tokenizer = build_lm(checkpoint=str(tmp_path / "lm"))
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(lm(ids).logits, loaded(ids).logits)
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    with pytest.raises(ValueError, match="needs a tokenizer"):
        build_lm()


def test_length_grouped_batches_are_deterministic_and_cover_the_data(tokenizer, vlm):
    _, processor = vlm
    scenes = make_scenes(30, seed=14)
    by_id = {s.scene_id: s for s in scenes}
    data = encode_records(make_instruction_dataset(scenes, seed=0), tokenizer, processor, N_IMAGE,
                          lambda r: render_scene(by_id[r["scene_id"]], 16))
    first = data.batch(8, step=3, seed=1)
    assert torch.equal(first["input_ids"], data.batch(8, step=3, seed=1)["input_ids"])
    padding = {}
    for group in (1, 8):
        batches = [data.batch(8, step, seed=1, group=group) for step in range(64)]
        padding[group] = sum((b["attention_mask"] == 0).sum().item() for b in batches)
        assert all(b["input_ids"].shape[0] == 8 == b["pixel_values"].shape[0] for b in batches)
    assert padding[8] < 0.5 * padding[1]
    with pytest.raises(ValueError, match="must be positive"):
        data.batch(0, step=0)


def test_instruction_tuned_vlm_is_cached_and_equals_a_published_run(tmp_path):
    """Section 3.2's model is built once per recipe; a notebook's own run (the same
    `instruction_tune`) published to the cache is bit-identical to what the cache builds."""
    from companion.instruction import (InstructionRecipe, instruction_tune, instruction_tuned_vlm,
                                       publish_instruction_tuned)

    recipe = InstructionRecipe(tokenizer_scenes=40, clip_train_scenes=32, clip_steps=2,
                               clip_batch_size=8, lm_scenes=10, lm_steps=2, train_scenes=8,
                               stage1_steps=2, stage2_steps=3, batch_size=4)
    messages = []
    model, _, tokenizer = instruction_tuned_vlm(tmp_path / "a", recipe, log=messages.append)
    again, _, _ = instruction_tuned_vlm(tmp_path / "a", recipe, log=messages.append)
    assert [m.split()[0] for m in messages if "vlm-sft" in m] == ["building", "loaded"]
    run, processor, run_tokenizer, histories = instruction_tune(recipe, tmp_path / "a")
    assert set(histories) == {"stage1", "stage2"} and len(histories["stage2"].steps) == 3
    published = publish_instruction_tuned(tmp_path / "b", recipe, run, processor, run_tokenizer,
                                          histories, log=None)
    assert published.name == next((tmp_path / "a").glob("vlm-sft-*")).name  # same cache key
    loaded, _, _ = instruction_tuned_vlm(tmp_path / "b", recipe, log=messages.append)
    assert messages[-1].startswith("loaded")
    for (name, a), b, c in zip(model.state_dict().items(), again.state_dict().values(),
                               loaded.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c), name
    assert len(tokenizer) == len(run_tokenizer)
    with pytest.raises(ValueError, match="stage2_steps"):
        InstructionRecipe(stage2_steps=0)


def test_recipe_options_build_their_data_and_the_vision_cache_trains_the_same_model(tmp_path):
    """The options of InstructionRecipe: each enters the cache key; evidence-first, joined
    conversations and the careless annotator reach stage 2's data; training from cached tower
    features gives the model that training from pixels gives."""
    from companion.instruction import InstructionRecipe, instruction_records, instruction_tune, \
        stage_records

    base = dict(tokenizer_scenes=40, clip_train_scenes=32, clip_steps=2, clip_batch_size=8,
                lm_scenes=10, lm_steps=2, train_scenes=8, stage1_steps=2, stage2_steps=3,
                batch_size=4)
    assert InstructionRecipe(**base).to_dict()["vision_cache"] is False
    options = dict(lm_loss_on="replies", lm_questions_per_conversation=3,
                   answer_style="evidence_first", questions_per_conversation=3,
                   annotator_hallucination_rate=1.0)
    recipe = InstructionRecipe(**base, **options)
    assert {k: recipe.to_dict()[k] for k in options} == options
    lm = recipe.lm_recipe()
    assert (lm.loss_on, lm.questions_per_conversation, lm.answer_style, lm.max_length) == (
        "replies", 3, "evidence_first", 512)
    by_id, records = instruction_records(recipe)
    careless = [r for r in records if r.get("annotator")]
    assert careless and {r["task"] for r in careless} == {"description", "multi_turn"}
    stages = stage_records(recipe, records)
    descriptions = [r for r in records if r["task"] == "description"]
    assert [r["id"] for r in stages["stage1"]] == [r["id"] for r in descriptions]
    # stage 1 reads the true captions; the careless ones are stage 2's
    assert not any(r.get("annotator") for r in stages["stage1"])
    assert [r["conversations"][1]["value"] for r in stages["stage1"]] == [
        r["annotator"]["clean"] if r.get("annotator") else r["conversations"][1]["value"]
        for r in descriptions]
    assert any(r.get("annotator") for r in descriptions)
    assert len(stages["stage2"]) < len(records)
    assert all(len(r["merged"]) <= 3 for r in stages["stage2"])
    assert any(t["value"].endswith((", so yes.", ", so no."))
               for r in records for t in r["conversations"])

    plain, _, _, plain_hist = instruction_tune(recipe, tmp_path)
    cached_recipe = InstructionRecipe(**base, **options, vision_cache=True)
    cached, _, _, cached_hist = instruction_tune(cached_recipe, tmp_path)
    for (name, a), b in zip(plain.state_dict().items(), cached.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name
    assert [h["loss"] for h in cached_hist["stage2"].steps] == pytest.approx(
        [h["loss"] for h in plain_hist["stage2"].steps], rel=1e-5)
    for bad, message in (({"answer_style": "chatty"}, "answer_style='chatty'"),
                         ({"questions_per_conversation": 0}, "questions_per_conversation=0"),
                         ({"annotator_hallucination_rate": 2.0}, "rate=2.0 must be in"),
                         ({"lm_loss_on": "x"}, "loss_on='x'")):
        with pytest.raises(ValueError, match=message):
            InstructionRecipe(**bad)


def test_a_llava_json_with_image_files_encodes_exactly_as_the_world_in_memory(tmp_path, tokenizer,
                                                                                vlm):
    """The real-file path (LLaVA JSON + image folder, as `train_json` / `image_folder` in 3.2)
    gives the same tokens, labels and pixels as the in-memory world records it was written
    from; text-only records are reported, and an unreadable image names its record."""
    import json

    from companion.data.llava import load_llava_json
    from companion.instruction import encode_file_data, encode_stage_data
    from companion.world import export_llava_dataset

    _, processor = vlm
    scenes = make_scenes(6, seed=4)
    records = make_instruction_dataset(scenes, seed=4)
    folder = export_llava_dataset(scenes, records, tmp_path / "data", image_size=16)
    loaded = load_llava_json(folder / "data.json")
    in_memory = encode_stage_data(records, {s.scene_id: s for s in scenes}, tokenizer, processor,
                                  N_IMAGE, 16)
    from_files = encode_file_data(loaded, folder, tokenizer, processor, N_IMAGE)
    for stage in ("stage1", "stage2"):
        assert from_files[stage].examples == in_memory[stage].examples, stage
        assert torch.equal(from_files[stage].pixel_values, in_memory[stage].pixel_values), stage
        assert from_files[stage].tasks == in_memory[stage].tasks
    assert set(from_files["stage1"].tasks) == {"description"}

    # a separate stage-1 file, a text-only record, an unreadable image
    text_only = {"id": "chat", "conversations": [{"from": "human", "value": "Hello?"},
                                                 {"from": "gpt", "value": "Hello."}]}
    with pytest.warns(UserWarning, match="1 of .* records are text-only"):
        data = encode_file_data(loaded + [text_only], folder, tokenizer, processor, N_IMAGE,
                                stage1_records=loaded[:2])
    assert len(data["stage1"]) == 2 and ("chat", "text-only record (no image); left out") in \
        data["stage2"].skipped
    (folder / loaded[0]["image"]).write_bytes(b"not a png")
    with pytest.raises(ValueError, match=rf"record {loaded[0]['id']!r}: image .* cannot be read"):
        encode_file_data(loaded, folder, tokenizer, processor, N_IMAGE)
    (folder / loaded[0]["image"]).unlink()
    with pytest.raises(FileNotFoundError, match="relative to the image folder"):
        encode_file_data(loaded, folder, tokenizer, processor, N_IMAGE)
    with pytest.raises(ValueError, match="none of the 1 records has an image"):
        encode_file_data([text_only], folder, tokenizer, processor, N_IMAGE)
    assert json.loads((folder / "data.json").read_text())[0]["id"] == loaded[0]["id"]


def test_the_lm_size_reaches_the_lm_recipe_and_the_cache_key():
    """lm_layers builds the LM it names and keys the instruction-tuned model by it; at its
    default the keys are those of the runs cached before the field existed."""
    from companion.instruction import InstructionRecipe, _instruction_artifact_config
    from companion.lm import TinyLMConfig

    deep = InstructionRecipe(lm_layers=4)
    assert deep.lm_recipe().sizes == TinyLMConfig(layers=4)
    assert deep.to_dict()["lm_layers"] == 4 and "lm_layers" not in InstructionRecipe().to_dict()
    keys = [_instruction_artifact_config(r) for r in (InstructionRecipe(), deep)]
    assert keys[0]["lm_sizes"] == TinyLMConfig().to_dict()
    assert keys[1]["lm_sizes"]["layers"] == 4 and keys[0]["recipe"] != keys[1]["recipe"]
    assert InstructionRecipe(lm_layers=2).lm_recipe().sizes == TinyLMConfig()
    # a field's value from before it existed keeps the old key; any other value enters it,
    # whatever the default is now
    merged, plain = InstructionRecipe(merge_patches=2), InstructionRecipe(merge_patches=1)
    assert merged.to_dict()["merge_patches"] == 2 and "merge_patches" not in plain.to_dict()
    assert _instruction_artifact_config(merged) != _instruction_artifact_config(plain)
    with pytest.raises(ValueError, match="merge_patches=0"):
        InstructionRecipe(merge_patches=0)


def test_recipe_from_parameters_maps_names_keeps_base_and_ignores_the_rest():
    from companion.instruction import (NOTEBOOK_PARAMETERS, InstructionRecipe,
                                       recipe_from_parameters)

    assert recipe_from_parameters({}) == InstructionRecipe()
    values = {"stage2_steps": 7, "merge_patches": 1, "lr_of_something_else": 3, "seed": 4}
    recipe = recipe_from_parameters(values)
    assert (recipe.stage2_steps, recipe.merge_patches, recipe.seed) == (7, 1, 4)
    assert replace(recipe, stage2_steps=InstructionRecipe().stage2_steps, merge_patches=(
        InstructionRecipe().merge_patches), seed=0) == InstructionRecipe()
    assert all(hasattr(InstructionRecipe(), name) for name in NOTEBOOK_PARAMETERS)
    base = InstructionRecipe(annotator_hallucination_rate=0.5)
    renamed = recipe_from_parameters({"sft_train_scenes": 11, "train_scenes": 99},
                                     names={"sft_train_scenes": "train_scenes"}, base=base)
    assert renamed == replace(base, train_scenes=11)
