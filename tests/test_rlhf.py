"""RLHF on the VLM: preference data, the reward model, DPO and PPO plumbing (section 3.3)."""

import json
import math

import pytest
import torch

from companion.dpo import DPOConfig, dpo_batch_loss, reference_logps, reply_logps, train_dpo
from companion.answers import generate_tokens
from companion.batching import IGNORE_INDEX
from companion.instruction import InstructionRecipe
from companion.models import TinyClipConfig, build_clip
from companion.ppo import (PolicyWithValueHead, PPOConfig, reference_reply_logps,
                           reply_logps_values, rollout, train_ppo)
from companion.preference import (RewardModel, encode_preferences, label_preferences,
                                  last_token_index, load_preferences, pair_accuracy,
                                  preference_prompts, prompt_turns, reward_model_loss,
                                  reward_trainable,
                                  sample_replies, save_preferences, score_pairs,
                                  score_replies, validate_preference_records)
from companion.rlhf import RLHFRecipe, train_reward_model
from companion.tokenizer import train_tokenizer, world_corpus
from companion.llava import image_seq_length
from companion.lm import TinyLMConfig, build_lm
from companion.tokenizer import image_token_id
from companion.vlm import build_vlm
from companion.world import make_scenes, render_scene

CLIP_SIZES = TinyClipConfig(image_size=16, patch_size=8, vision_width=32, vision_layers=1,
                            text_width=32, text_layers=1, heads=2, projection_dim=16)
LM_SIZES = TinyLMConfig(hidden_size=32, layers=1, heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def world():
    tokenizer = train_tokenizer(world_corpus(40, seed=1), vocab_size=400)
    clip, processor, _ = build_clip(tokenizer, sizes=CLIP_SIZES, seed=0)
    lm, _ = build_lm(tokenizer, sizes=LM_SIZES, seed=0)
    scenes = make_scenes(6, seed=5, start_id=50_000_000)
    prompts = preference_prompts(scenes, seed=5)
    by_id = {s.scene_id: s for s in scenes}
    from companion.clip import pixel_values_for

    pixels = pixel_values_for(processor, [render_scene(by_id[p["scene_id"]], 16) for p in prompts])
    return {"tokenizer": tokenizer, "clip": clip, "lm": lm, "processor": processor,
            "scenes": by_id, "prompts": prompts, "pixels": pixels}


def _vlm(world, seed=0):
    return build_vlm(world["clip"], world["lm"], world["tokenizer"], seed=seed).eval()


def _record(**change):
    record = {"id": "r0", "prompt": "<image>\nHow many circles are there?",
              "chosen": "There is one circle.", "rejected": "There are two circles.",
              "images": ["images/0.png"]}
    record.update(change)
    return record


# ----------------------------------------------------------------------------- preference data

def test_labeler_prefers_the_better_reply_and_noise_flips_it(world):
    prompt = next(p for p in world["prompts"] if p["task"] == "counting")
    scene = world["scenes"][prompt["scene_id"]]
    replies = [[prompt["reference"], "There are nine purple hexagons.", prompt["reference"]]]
    clean = label_preferences([prompt], replies, world["scenes"], noise=0.0)
    assert len(clean) == 1 and clean[0]["chosen"] == prompt["reference"]
    assert clean[0]["chosen_utility"] > clean[0]["rejected_utility"]
    assert clean[0]["rejected_hallucinated"] and not clean[0]["flipped"]
    flipped = label_preferences([prompt], replies, world["scenes"], noise=1.0)
    assert flipped[0]["chosen"] == "There are nine purple hexagons." and flipped[0]["flipped"]
    ties = label_preferences([prompt], [[prompt["reference"]] * 3], world["scenes"])
    assert ties == []  # all replies equally good: no preference to learn from
    validate_preference_records(clean)
    assert scene.scene_id == clean[0]["scene_id"]
    with pytest.raises(ValueError, match="noise"):
        label_preferences([prompt], replies, world["scenes"], noise=1.5)


def test_noise_flips_about_the_requested_share(world):
    prompt = next(p for p in world["prompts"] if p["task"] == "counting")
    replies = [[prompt["reference"], "There are nine purple hexagons."]] * 400
    records = label_preferences([prompt] * 400, replies, world["scenes"], noise=0.3, seed=1)
    share = sum(r["flipped"] for r in records) / len(records)
    assert 0.24 < share < 0.36


@pytest.mark.parametrize("change, message", [
    ({"chosen": None}, "key 'chosen'"),
    ({"prompt": "  "}, "non-empty"),
    ({"prompt": "How many?"}, "placeholder"),
    ({"images": "a.png"}, "key 'images'"),
    ({"images": ["a.png", "b.png"]}, "key 'images'"),
])
def test_bad_preference_records_name_the_record_and_key(change, message):
    with pytest.raises(ValueError, match=message) as error:
        validate_preference_records([_record(), _record(**change)], "prefs.json")
    assert "prefs.json, record 1" in str(error.value)


def test_missing_keys_and_bad_files(tmp_path):
    record = _record()
    del record["rejected"]
    with pytest.raises(ValueError, match="missing key 'rejected'"):
        validate_preference_records([record])
    with pytest.raises(ValueError, match="no records"):
        validate_preference_records([])
    with pytest.raises(FileNotFoundError, match="no preference file"):
        load_preferences(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_preferences(bad)
    good = tmp_path / "good.json"
    save_preferences(good, [_record()])
    assert load_preferences(good) == [_record()]
    assert not (tmp_path / "good.json.tmp").exists()
    assert json.loads(good.read_text())[0]["chosen"] == "There is one circle."


def test_pairs_carry_labels_on_the_reply_only(world):
    vlm = _vlm(world)
    data = encode_preferences([_record()], world["tokenizer"], world["processor"],
                              image_seq_length(vlm), lambda r: render_scene(
                                  next(iter(world["scenes"].values())), 16))
    tok = world["tokenizer"]
    for example, text in ((data.chosen[0], "There is one circle."),
                          (data.rejected[0], "There are two circles.")):
        kept = [t for t in example["labels"] if t != IGNORE_INDEX]
        assert tok.decode(kept[:-1]) .strip() == text  # the reply, then <|end|>
        assert kept[-1] == tok.convert_tokens_to_ids("<|end|>")
    batch = data.batch([0], tok.pad_token_id)
    assert batch["n_pairs"] == 1 and batch["input_ids"].shape[0] == 2
    assert batch["pixel_values"].shape[0] == 2


def test_the_factual_reward_models_pairs_read_image_facts_question_reply_in_that_order(world):
    """Which tokens the factual reward model sees: the chat template's user header, one
    <image> per patch, the ground truth in words, the question, then the reply; the loss
    labels only the reply. Checked against an encoding built piece by piece."""
    vlm, tok = _vlm(world), world["tokenizer"]
    facts = "Scene: a small red circle at the top left."
    data = encode_preferences([_record()], tok, world["processor"], image_seq_length(vlm),
                              lambda r: render_scene(next(iter(world["scenes"].values())), 16),
                              facts=lambda record: facts)
    plain = encode_preferences([_record()], tok, world["processor"], image_seq_length(vlm),
                               lambda r: render_scene(next(iter(world["scenes"].values())), 16))
    ids, labels = data.chosen[0]["input_ids"], data.chosen[0]["labels"]
    image_id, n_image = image_token_id(tok), image_seq_length(vlm)
    first = ids.index(image_id)
    assert ids[first:first + n_image] == [image_id] * n_image
    after_image = tok.decode(ids[first + n_image:], skip_special_tokens=False)
    assert after_image.replace(" ", "").startswith(
        f"\n{facts}\nHowmanycirclesarethere?".replace(" ", ""))
    fact_ids = tok.encode(facts, add_special_tokens=False)
    at = next(i for i in range(len(ids)) if ids[i:i + len(fact_ids)] == fact_ids)
    assert first + n_image < at and all(label == IGNORE_INDEX for label in labels[:at + 10])
    # the reply's labels are the same with or without the facts
    kept = [t for t in labels if t != IGNORE_INDEX]
    assert kept == [t for t in plain.chosen[0]["labels"] if t != IGNORE_INDEX]
    assert len(ids) - len(plain.chosen[0]["input_ids"]) >= len(fact_ids)
    # score_replies builds the same sequence
    model = RewardModel(vlm, reads_facts=True)
    torch.nn.init.normal_(model.reward_head.weight)
    pixels = world["pixels"][:1]
    with_facts = score_replies(model, tok, [_record()["prompt"]], ["There is one circle."],
                               pixels, facts=[facts])
    batch = data.batch([0], tok.pad_token_id)
    direct = model(batch["input_ids"][:1], batch["attention_mask"][:1], pixels,
                   (batch["labels"][:1] != IGNORE_INDEX))
    assert torch.allclose(with_facts, direct.detach(), atol=1e-6)


@pytest.mark.parametrize("prompt, facts, message", [
    ("<image>\nHow many?", "", "facts='': give the image's ground truth"),
    ("How many circles?", "Scene: x.", "does not start with <image> and a new line"),
])
def test_facts_that_cannot_be_placed_are_refused(prompt, facts, message):
    with pytest.raises(ValueError, match=message):
        prompt_turns(prompt, facts)


def test_a_reward_model_scores_only_the_prompt_layout_it_was_trained_on(world):
    """A factual reward model given prompts without the facts (or a plain one given facts)
    would return numbers, but wrong ones: score_pairs, score_replies and training refuse or
    carry the layout, and evaluate_policy follows the reward model by default."""
    tok, scene = world["tokenizer"], next(iter(world["scenes"].values()))
    records = [_record(), _record(id="r1", chosen="One circle.")]
    plain = encode_preferences(records, tok, world["processor"], 4,
                               lambda r: render_scene(scene, 16))
    factual = encode_preferences(records, tok, world["processor"], 4,
                                 lambda r: render_scene(scene, 16), facts=lambda r: "Scene: x.")
    assert not plain.factual and factual.factual
    reads, blind = RewardModel(_vlm(world), reads_facts=True), RewardModel(_vlm(world))
    with pytest.raises(ValueError, match="reads the scene's facts, and the pairs carry none"):
        score_pairs(reads, plain, tok.pad_token_id)
    with pytest.raises(ValueError, match="the pairs carry the scene's facts, and this reward"):
        score_pairs(blind, factual, tok.pad_token_id)
    chosen, _ = score_pairs(reads, factual, tok.pad_token_id)
    assert len(chosen) == 2 and not chosen.requires_grad  # scores, not a graph
    prompt, pixels = [_record()["prompt"]], world["pixels"][:1]
    with pytest.raises(ValueError, match="the prompts carry none"):
        score_replies(reads, tok, prompt, ["x"], pixels)
    with pytest.raises(ValueError, match="the prompts carry the scene's facts"):
        score_replies(blind, tok, prompt, ["x"], pixels, facts=["Scene: x."])
    trained, _ = train_reward_model(_vlm(world), factual, tok.pad_token_id, "last", steps=1,
                                    lr=1e-4, batch_size=2)
    assert trained.reads_facts


def test_score_replies_needs_one_fact_per_prompt(world):
    model = RewardModel(_vlm(world), reads_facts=True)
    with pytest.raises(ValueError, match="1 facts for 2 prompts"):
        score_replies(model, world["tokenizer"], ["<image>\nA?"] * 2, ["x", "y"],
                      world["pixels"][:2], facts=["Scene: a."])


# ----------------------------------------------------------------------------- reward model

def test_last_token_index_for_right_and_left_padding():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    assert last_token_index(right).tolist() == [2, 3, 0]
    assert last_token_index(left).tolist() == [3, 3]
    with pytest.raises(ValueError, match=r"rows \[1\] are all padding"):
        last_token_index(torch.tensor([[1, 0], [0, 0]]))


def test_reward_is_read_at_the_last_real_token_whatever_the_padding(world):
    model = RewardModel(_vlm(world))
    torch.nn.init.normal_(model.reward_head.weight)
    tok = world["tokenizer"]
    prompts = [world["prompts"][0]["prompt"]] * 2
    replies = ["There is one circle.", "There is one circle at the top left of the image."]
    pixels = world["pixels"][:1].repeat(2, 1, 1, 1)
    together = score_replies(model, tok, prompts, replies, pixels)
    alone = score_replies(model, tok, prompts[:1], replies[:1], pixels[:1])
    assert torch.allclose(together[0], alone[0], atol=1e-5)  # padding does not move the score
    assert not torch.allclose(together[0], together[1])


def test_reward_model_loss_is_bradley_terry_on_its_rewards(world):
    model = RewardModel(_vlm(world))
    torch.nn.init.normal_(model.reward_head.weight)
    data = encode_preferences([_record(), _record(id="r1", chosen="One circle.")],
                              world["tokenizer"], world["processor"], 4,
                              lambda r: render_scene(next(iter(world["scenes"].values())), 16))
    batch = data.batch([0, 1], world["tokenizer"].pad_token_id)
    loss, stats = reward_model_loss(model, batch)
    rewards = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).double()
    expected = -torch.nn.functional.logsigmoid(rewards[:2] - rewards[2:]).mean()
    assert math.isclose(float(loss.detach()), float(expected.detach()), rel_tol=1e-5)
    assert stats["accuracy"] == float((rewards[:2] > rewards[2:]).float().mean())
    counts = reward_trainable(model)
    assert counts["vision"] == 0 and counts["projector+lm+head"] > 0
    assert not any(p.requires_grad for n, p in model.named_parameters() if "vision_tower" in n)
    assert 0.0 <= pair_accuracy(model, data, world["tokenizer"].pad_token_id) <= 1.0


def test_reward_model_loss_takes_rewards_relative_to_fixed_offsets_of_each_row(world):
    model = RewardModel(_vlm(world))
    torch.nn.init.normal_(model.reward_head.weight)
    data = _pairs(world)
    offsets = (torch.tensor([0.5, -1.0]), torch.tensor([2.0, 0.25]))
    batch = data.batch([1, 0, 1], world["tokenizer"].pad_token_id)  # rows in another order
    loss, stats = reward_model_loss(model, batch, offsets=offsets)
    rewards = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).double()
    rows = [1, 0, 1]
    chosen = rewards[:3] - torch.tensor([float(offsets[0][r]) for r in rows], dtype=torch.float64)
    rejected = rewards[3:] - torch.tensor([float(offsets[1][r]) for r in rows],
                                          dtype=torch.float64)
    expected = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
    assert math.isclose(float(loss.detach()), float(expected.detach()), rel_tol=1e-5)
    assert stats["accuracy"] == float((chosen > rejected).float().mean())
    plain, _ = reward_model_loss(model, batch)
    assert not math.isclose(float(plain.detach()), float(loss.detach()), rel_tol=1e-3)
    from companion.rlhf import train_reward_model
    with pytest.raises(ValueError, match="offsets for 1 and 1 pairs; the data has 2"):
        train_reward_model(_vlm(world), data, world["tokenizer"].pad_token_id,
                           offsets=(torch.zeros(1), torch.zeros(1)))


def test_likelihood_reward_is_the_models_own_reply_log_prob(world):
    vlm = _vlm(world)
    model = RewardModel(vlm, pooling="likelihood")
    assert not hasattr(model, "reward_head")  # no new head: the LM head reads the reply
    data = _pairs(world)
    batch = data.batch([0, 1], world["tokenizer"].pad_token_id)
    reply = batch["labels"] != IGNORE_INDEX
    rewards = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], reply)
    assert torch.allclose(rewards, reply_logps(vlm, batch), atol=1e-5)  # the policy's path
    logits = vlm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 pixel_values=batch["pixel_values"]).logits.double()
    expected = []  # float64, token by token: log p of each reply token given what precedes it
    for row in range(len(rewards)):
        positions = reply[row].nonzero().flatten().tolist()
        log_p = torch.log_softmax(logits[row], dim=-1)
        expected.append(sum(float(log_p[t - 1, batch["input_ids"][row, t]]) for t in positions))
    assert torch.allclose(rewards.double(), torch.tensor(expected, dtype=torch.float64),
                          atol=1e-4)
    loss, _ = reward_model_loss(model, batch)
    loss.backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


def test_likelihood_reward_ignores_padding_on_either_side_and_needs_the_reply_mask(world):
    model = RewardModel(_vlm(world), pooling="likelihood")
    prompts = [world["prompts"][0]["prompt"]] * 2
    replies = ["There is one circle.", "There is one circle at the top left of the image."]
    pixels = world["pixels"][:1].repeat(2, 1, 1, 1)
    together = score_replies(model, world["tokenizer"], prompts, replies, pixels)  # right-padded
    alone = score_replies(model, world["tokenizer"], prompts[:1], replies[:1], pixels[:1])
    assert torch.allclose(together[0], alone[0], atol=1e-4)
    batch = _pairs(world).batch([0], world["tokenizer"].pad_token_id)
    reply = batch["labels"] != IGNORE_INDEX
    plain = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], reply)
    pad = torch.full((2, 3), world["tokenizer"].pad_token_id)
    left = model(torch.cat([pad, batch["input_ids"]], 1),
                 torch.cat([torch.zeros_like(pad), batch["attention_mask"]], 1),
                 batch["pixel_values"], torch.cat([torch.zeros_like(pad, dtype=bool), reply], 1))
    assert torch.allclose(plain, left, atol=1e-4)  # positions count from the first real token
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="pooling='likelihood' needs reply_mask"):
        model(ids, torch.ones_like(ids), pixels[:1])
    with pytest.raises(ValueError, match="expected one of last, mean, likelihood"):
        RewardModel(_vlm(world), pooling="max")


# ----------------------------------------------------------------------------- DPO

def _pairs(world):
    return encode_preferences([_record(), _record(id="r1", chosen="One circle.",
                                                  rejected="There are three red squares.")],
                              world["tokenizer"], world["processor"], 4,
                              lambda r: render_scene(next(iter(world["scenes"].values())), 16))


def test_dpo_loss_is_ln2_against_itself_and_padding_does_not_change_logps(world):
    vlm = _vlm(world)
    data = _pairs(world)
    pad = world["tokenizer"].pad_token_id
    ref_c, ref_r = reference_logps(vlm, data, pad)
    loss, stats = dpo_batch_loss(vlm, data.batch([0, 1], pad), ref_c, ref_r)
    assert math.isclose(float(loss.detach()), math.log(2), rel_tol=1e-5)
    assert stats["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    one = reply_logps(vlm, data.batch([1], pad))
    both = reply_logps(vlm, data.batch([0, 1], pad))
    assert torch.allclose(one, both[[1, 3]], atol=1e-4)


def test_dpo_training_raises_the_chosen_margin(world):
    policy, reference = _vlm(world), _vlm(world)
    for name, p in policy.named_parameters():
        p.requires_grad_("vision_tower" not in name)
    data = _pairs(world)
    history = train_dpo(policy, reference, data, world["tokenizer"].pad_token_id,
                        DPOConfig(steps=15, lr=3e-3, batch_size=2), log=None)
    assert history.steps[-1]["reward_margin"] > 0.05
    assert history.steps[-1]["loss"] < math.log(2)


# ----------------------------------------------------------------------------- PPO

def test_rollout_layout_and_kl_zero_against_itself(world):
    policy = PolicyWithValueHead(_vlm(world))
    texts = [p["prompt"] for p in world["prompts"]]
    batch = rollout(policy, world["tokenizer"], texts, world["pixels"], [0, 1, 2],
                    max_new_tokens=6, seed=3)
    p = batch.prompt_length
    assert batch.input_ids.shape[1] == p + batch.reply_mask.shape[1]
    assert (batch.attention_mask[:, p:].bool() == batch.reply_mask).all()
    # reply tokens are right-padded: once a row's reply ends it stays ended
    assert (batch.reply_mask[:, 1:] <= batch.reply_mask[:, :-1]).all()
    logps, values = reply_logps_values(policy, batch)
    ref = reference_reply_logps(policy.vlm, batch)
    assert torch.allclose(logps, ref, atol=1e-5)
    # zero-init head
    assert values.shape == logps.shape and float(values.detach().abs().max()) == 0.0


def test_forward_scores_replies_as_generate_sampled_them(world):
    """Left-padded prompts: the forward pass must use the same positions as generate."""
    vlm = _vlm(world)
    policy = PolicyWithValueHead(vlm)
    texts = [p["prompt"] for p in world["prompts"]]
    rows = [0, 3]  # prompts of different lengths
    batch = rollout(policy, world["tokenizer"], texts, world["pixels"], rows,
                    max_new_tokens=4, seed=1)
    logps, _ = reply_logps_values(policy, batch)
    for i, row in enumerate(rows):  # score each row alone, unpadded
        prompt, _ = generate_tokens(vlm, world["tokenizer"],
                                    [[{"from": "human", "value": texts[row]}]],
                                    world["pixels"][[row]], max_new_tokens=1)
        reply = batch.input_ids[i, batch.prompt_length:][batch.reply_mask[i]]
        ids = torch.tensor([prompt[0] + reply.tolist()])
        logits = vlm(input_ids=ids, pixel_values=world["pixels"][[row]]).logits
        logits[..., image_token_id(world["tokenizer"])] = float("-inf")  # never sampled
        ref = torch.log_softmax(logits[0, len(prompt[0]) - 1:-1], -1).gather(
            -1, reply[:, None]).squeeze(-1)
        assert torch.allclose(logps[i][batch.reply_mask[i]], ref, atol=1e-4)


def test_generation_never_samples_the_image_placeholder(world):
    """A reply holding <image> could not be scored (placeholders must match image features)."""
    vlm = _vlm(world)
    image_id = image_token_id(world["tokenizer"])
    head = torch.nn.Linear(vlm.lm_head.in_features, vlm.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(vlm.lm_head.weight)
        head.bias.zero_()
        head.bias[image_id] = 50.0  # the placeholder is by far the likeliest next token
    vlm.lm_head = head
    policy = PolicyWithValueHead(vlm)
    batch = rollout(policy, world["tokenizer"], [p["prompt"] for p in world["prompts"]],
                    world["pixels"], [0, 1], max_new_tokens=5, seed=0)
    assert not (batch.input_ids[:, batch.prompt_length:] == image_id).any()
    logps, _ = reply_logps_values(policy, batch)  # and the replies can be scored
    assert torch.isfinite(logps[batch.reply_mask]).all()


def test_ppo_trains_the_policy_and_leaves_the_vision_tower_and_reference(world):
    policy = PolicyWithValueHead(_vlm(world))
    for name, p in policy.named_parameters():
        p.requires_grad_("vision_tower" not in name)
    reference = _vlm(world)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    ref_before = {n: p.detach().clone() for n, p in reference.named_parameters()}
    texts = [p["prompt"] for p in world["prompts"]]
    history = train_ppo(policy, reference, world["tokenizer"], texts, world["pixels"],
                        lambda rows, replies: torch.tensor([float(len(r)) for r in replies]),
                        PPOConfig(iterations=2, batch_size=4, max_new_tokens=5, lr=1e-3),
                        log=None)
    assert [set(s) >= {"reward", "kl", "length", "beta"} for s in history.steps] == [True] * 2
    for name, p in policy.named_parameters():
        assert torch.equal(p, before[name]) == ("vision_tower" in name), name
    assert all(torch.equal(p, ref_before[n]) for n, p in reference.named_parameters())
    assert history.steps[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # identical at the start


def test_ppo_with_score_norm_feeds_the_scores_on_their_running_scale(world, monkeypatch):
    import companion.ppo as ppo_module

    seen = []
    real = ppo_module.reward_with_kl

    def spy(scores, *args, **kwargs):
        seen.append(scores.clone())
        return real(scores, *args, **kwargs)

    monkeypatch.setattr(ppo_module, "reward_with_kl", spy)
    raw = []

    def reward_fn(rows, replies):  # a likelihood-sized score: tens of nats, spread of a few
        scores = torch.tensor([-40.0 - 3.0 * r - len(t) for r, t in zip(rows, replies)])
        raw.append(scores)
        return scores

    texts = [p["prompt"] for p in world["prompts"]]
    history = train_ppo(PolicyWithValueHead(_vlm(world)), _vlm(world), world["tokenizer"],
                        texts, world["pixels"], reward_fn,
                        PPOConfig(iterations=2, batch_size=4, max_new_tokens=5, score_norm=True),
                        log=None)
    everything = torch.cat(raw).double()
    first = (raw[0].double() - raw[0].double().mean()) / raw[0].double().std()
    assert torch.allclose(seen[0].double(), first, atol=1e-5)  # moments of batch 1 alone
    second = (raw[1].double() - everything.mean()) / everything.std()
    assert torch.allclose(seen[1].double(), second, atol=1e-5)  # of both batches
    assert history.steps[0]["reward"] == pytest.approx(float(raw[0].mean()))  # logged raw


def test_ppo_config_errors():
    with pytest.raises(ValueError, match="minibatches"):
        PPOConfig(batch_size=2, minibatches=3)
    with pytest.raises(ValueError, match="init_kl_coef"):
        PPOConfig(init_kl_coef=-1)


def test_sample_replies_needs_two(world):
    with pytest.raises(ValueError, match="at least two"):
        sample_replies(None, world["tokenizer"], world["prompts"], world["pixels"], n_samples=1)


def test_flip_preferences_swaps_the_whole_comparison():
    from companion.preference import flip_preferences

    record = {**_record(), "chosen_utility": 1.0, "rejected_utility": -0.5,
              "chosen_hallucinated": False, "rejected_hallucinated": True, "flipped": False}
    flipped = flip_preferences([record], 1.0)[0]
    assert (flipped["chosen"], flipped["rejected"]) == (record["rejected"], record["chosen"])
    assert flipped["chosen_utility"] == -0.5 and flipped["chosen_hallucinated"]
    assert flipped["flipped"] and not record["flipped"]  # the input is not modified
    assert flip_preferences([record], 0.0)[0] == record
    with pytest.raises(ValueError, match="noise"):
        flip_preferences([record], -0.1)


def test_best_worst_keeps_one_pair_and_all_keeps_every_distinct_comparison(world):
    prompt = next(p for p in world["prompts"] if p["task"] == "counting")
    replies = [[prompt["reference"], "There are nine purple hexagons.", "There is a word.",
                prompt["reference"]]]
    one = label_preferences([prompt], replies, world["scenes"], pairs="best_worst")
    every = label_preferences([prompt], replies, world["scenes"], pairs="all")
    assert len(one) == 1
    assert len({r["id"] for r in every}) == len(every) >= 2
    assert all(r["chosen_utility"] > r["rejected_utility"] for r in every)
    with pytest.raises(ValueError, match="pairs"):
        label_preferences([prompt], replies, world["scenes"], pairs="some")


def test_section_artifacts_are_built_once_and_reloaded(tmp_path):
    """3.3's preference data, reward model and PPO policy each build once per recipe, so
    each 3.3 notebook can run alone (building what it lacks) or load what an earlier one
    made."""
    from companion.rlhf import RLHFRecipe, ppo_policy, preference_records, reward_model

    sft = InstructionRecipe(tokenizer_scenes=40, clip_train_scenes=32, clip_steps=2,
                            clip_batch_size=8, lm_scenes=10, lm_steps=2, train_scenes=8,
                            stage1_steps=2, stage2_steps=3, batch_size=4)
    recipe = RLHFRecipe(sft=sft, scenes=10, samples=3, max_new_tokens=6, rm_steps=2,
                        ppo_iterations=2, ppo_batch_size=4)
    messages = []
    records = preference_records(tmp_path, recipe, log=messages.append)
    assert {r["split"] for r in records} <= {"train", "heldout"}
    validate_preference_records(records)
    model, history = reward_model(tmp_path, recipe, log=messages.append)
    policy, ppo_history = ppo_policy(tmp_path, recipe, log=messages.append)
    assert len(history) == 2 and len(ppo_history) == 2
    built = [m.split()[1] for m in messages if m.startswith("building")]
    assert built.count("rlhf-preferences") == 1 and built.count("reward-model") == 1
    assert built.count("ppo-policy") == 1
    again, _ = reward_model(tmp_path, recipe, log=messages.append)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 again.state_dict().values()))
    assert messages[-1].startswith("loaded reward-model")
    with pytest.raises(ValueError, match="noise"):
        RLHFRecipe(noise=2.0)


def test_recipe_from_notebook_parameters_maps_every_name():
    from companion.rlhf import MACHINE_WRITTEN, recipe_from_parameters

    recipe = recipe_from_parameters({"seed": 3, "sft_train_scenes": 5, "sft_batch_size": 2,
                                     "preference_scenes": 7, "rm_lr": 1e-3, "ppo_kl_coef": 0.0,
                                     "dpo_beta": 0.5, "output_dir": "x"})
    assert recipe.seed == recipe.sft.seed == 3
    assert (recipe.sft.train_scenes, recipe.sft.batch_size) == (5, 2)
    assert (recipe.scenes, recipe.rm_lr, recipe.ppo_kl_coef) == (7, 1e-3, 0.0)
    assert recipe.samples == RLHFRecipe().samples  # undeclared names keep their defaults
    # ... the starting model's too: 3.2's recipe on machine-written data, unless told 0
    assert recipe.sft.annotator_hallucination_rate == MACHINE_WRITTEN == 1.0
    assert recipe_from_parameters({}).sft == RLHFRecipe().sft != InstructionRecipe()
    clean = recipe_from_parameters({"annotator_hallucination_rate": 0.0})
    assert clean.sft == InstructionRecipe()  # 3.2's own model, the side-by-side's control
    seeds = recipe_from_parameters({"rm_factual": False, "annotator_hallucination_rate": 0.3,
                                    "rm_pooling": "last", "ppo_score_norm": False})
    assert not seeds.rm_factual and seeds.sft.annotator_hallucination_rate == 0.3
    assert seeds.rm_pooling == "last" and not seeds.ppo_score_norm
    # undeclared: the factual reward model on the world's pairs, the plain one on a file's
    assert recipe_from_parameters({}).rm_factual is True
    assert recipe_from_parameters({"rm_factual": None, "preference_json": "p.json"}
                                  ).rm_factual is False


def test_the_factual_reward_models_recipe_keys_and_data(world):
    from companion.rlhf import _rm_config, preference_data, scene_facts

    assert RLHFRecipe().rm_factual is True  # the world's pairs carry their scenes' facts
    assert RLHFRecipe(preference_json="pairs.json").rm_factual is False  # a file's do not
    assert "rm_factual" not in RLHFRecipe(rm_factual=False).to_dict()  # old keys unchanged
    assert _rm_config(RLHFRecipe(rm_factual=True)) != _rm_config(RLHFRecipe(rm_factual=False))
    with pytest.raises(ValueError, match="rm_factual=True needs the world's scenes"):
        RLHFRecipe(rm_factual=True, preference_json="pairs.json")
    prompt = world["prompts"][0]
    record = _record(prompt=prompt["prompt"], scene_id=prompt["scene_id"], split="train")
    vlm, tok = _vlm(world), world["tokenizer"]
    plain = preference_data([record], "train", tok, world["processor"], vlm, world["scenes"])
    factual = preference_data([record], "train", tok, world["processor"], vlm, world["scenes"],
                              factual=True)
    facts = scene_facts(world["scenes"], [prompt["scene_id"]])[0]
    assert facts.startswith("Scene: ") and facts in tok.decode(factual.chosen[0]["input_ids"],
                                                               skip_special_tokens=False)
    assert facts not in tok.decode(plain.chosen[0]["input_ids"], skip_special_tokens=False)
    with pytest.raises(ValueError, match="factual=True needs scenes_by_id"):
        preference_data([record], "train", tok, world["processor"], vlm, None,
                        image_folder="x", factual=True)


def test_a_preference_json_with_image_files_encodes_as_the_world_records(world, tmp_path):
    """The real-file path of DPO (preference_json + image_folder in 3.3.3): world preference
    records saved as TRL JSON with their images as PNG files encode to the same tokens and
    pixels as the same records rendered in memory; records without a split count as train."""
    from companion.preference import load_preferences, save_preferences
    from companion.rlhf import preference_data
    from companion.world import scene_png_bytes

    prompts = world["prompts"][:4]
    replies = [["There is one circle.", "There are two squares.", "No."] for _ in prompts]
    records = label_preferences(prompts, replies, world["scenes"], pairs="all")
    assert records
    (tmp_path / "images").mkdir()
    for scene in world["scenes"].values():
        (tmp_path / scene.image).write_bytes(scene_png_bytes(scene, 16))
    save_preferences(tmp_path / "prefs.json", records)
    loaded = load_preferences(tmp_path / "prefs.json")
    model = _vlm(world)
    args = (world["tokenizer"], world["processor"], model)
    in_memory = preference_data(records, "train", *args, scenes_by_id=world["scenes"])
    from_files = preference_data(loaded, "train", *args, image_folder=tmp_path)
    assert from_files.chosen == in_memory.chosen and from_files.rejected == in_memory.rejected
    assert torch.equal(from_files.pixel_values, in_memory.pixel_values)
    assert all("split" not in r for r in loaded) and len(from_files) == len(records)
    with pytest.raises(ValueError, match="needs scenes_by_id .* or image_folder"):
        preference_data(loaded, "train", *args)
    with pytest.raises(ValueError, match="no preference record in split 'heldout'"):
        preference_data(loaded, "heldout", *args, image_folder=tmp_path)
    (tmp_path / loaded[0]["images"][0]).unlink()
    with pytest.raises(FileNotFoundError, match=rf"preference record {loaded[0]['id']!r}: image"):
        preference_data(loaded, "train", *args, image_folder=tmp_path)


def test_a_preference_file_is_split_by_question_and_keyed_by_its_content(tmp_path):
    from companion.preference import save_preferences
    from companion.rlhf import _data_config, preference_records, split_preferences

    records = [_record(id=f"r{i}", prompt=f"<image>\nQuestion {i // 3}?",
                       images=[f"images/{i // 3}.png"]) for i in range(30)]
    split = split_preferences(records, 0.2, seed=1)
    held = {r["prompt"] for r in split if r["split"] == "heldout"}
    assert len(held) == 2  # 20% of the 10 questions
    assert not held & {r["prompt"] for r in split if r["split"] == "train"}
    assert split_preferences(records, 0.2, seed=1) == split and "split" not in records[0]
    given = [{**records[0], "split": "heldout"}] + records[1:]
    assert split_preferences(given, 0.0)[0]["split"] == "heldout"
    with pytest.raises(ValueError, match=r"record 0 \('r0'\): split 'test'"):
        split_preferences([{**records[0], "split": "test"}], 0.2)

    path = tmp_path / "prefs.json"
    save_preferences(path, records)
    recipe = RLHFRecipe(preference_json=str(path))
    assert recipe.image_root == tmp_path and "image_folder" not in recipe.to_dict()
    assert "preference_json" not in RLHFRecipe().to_dict()
    loaded = preference_records(tmp_path / "cache", recipe)
    assert loaded == split_preferences(records, recipe.heldout_fraction, recipe.seed)
    assert not (tmp_path / "cache").exists()  # a file is read, never sampled or cached
    key = _data_config(recipe)
    save_preferences(path, records[:-1])
    assert _data_config(recipe)["sha256"] != key["sha256"]
    with pytest.raises(FileNotFoundError, match="preference_json='.*missing.json': no such"):
        _data_config(RLHFRecipe(preference_json=str(tmp_path / "missing.json")))


def _judged(correct, hallucinated, tasks=("counting", "ocr")):
    from companion.answers import TaskScores

    return TaskScores([{"id": f"r{i}", "task": tasks[i % len(tasks)], "turn": 0, "correct": bool(c),
                        "hallucinations": ["x"] if h else []}
                       for i, (c, h) in enumerate(zip(correct, hallucinated))])


def test_versus_reference_model_calls_help_only_beyond_two_standard_errors():
    from companion.rlhf import versus_reference_model

    n = 200
    base = _judged([i % 2 for i in range(n)], [i % 3 == 0 for i in range(n)])  # 67 hallucinate
    clear = _judged([i % 2 for i in range(n)], [i % 6 == 0 for i in range(n)])  # 33 of the 67 fixed
    slight = _judged([i % 2 for i in range(n)],  # 10 fixed, 6 new: net -4 of 200
                     [(i % 3 == 0 and i >= 30) or (i % 3 == 1 and i < 18) for i in range(n)])
    costly = _judged([0] * n, [i % 6 == 0 for i in range(n)])
    worse = _judged([i % 2 for i in range(n)], [i % 3 == 0 or i % 5 == 1 for i in range(n)])
    out = versus_reference_model({"SFT": base, "clear": clear, "slight": slight,
                                  "costly": costly, "worse": worse}, base="SFT")
    assert set(out) == {"clear", "slight", "costly", "worse"}
    assert out["clear"]["verdict"] == "helped"
    assert out["clear"]["hallucination_change"] == pytest.approx(-33 / n)
    assert out["clear"]["accuracy_change"] == 0 and out["clear"]["accuracy_se"] == 0
    # lower, but not beyond 2 se (16 answers changed, in both directions)
    assert out["slight"]["hallucination_change"] == pytest.approx(-4 / n)
    assert out["slight"]["verdict"].startswith("did not help: no clear change")
    assert out["costly"]["verdict"].startswith("fewer hallucinations, but task accuracy fell")
    assert out["costly"]["accuracy_change"] == pytest.approx(-0.5)
    assert out["worse"]["verdict"] == "did not help: more hallucinations"
    with pytest.raises(ValueError, match="no run named 'PPO'"):
        versus_reference_model({"SFT": base}, base="PPO")


def test_headline_changes_are_the_paired_figures_and_their_share_of_the_sft_rate():
    from companion.rlhf import headline_changes, versus_reference_model

    n = 200
    base = _judged([i % 2 for i in range(n)], [i % 3 == 0 for i in range(n)])  # 67 of 200
    fixed = _judged([i % 2 for i in range(n)], [i % 6 == 0 for i in range(n)])  # 34 of 200
    change = versus_reference_model({"SFT": base, "DPO": fixed}, base="SFT")["DPO"]
    out = headline_changes("dpo", change, 67 / n)
    assert out == {"dpo_hallucination_change": pytest.approx(-33 / n),
                   "dpo_hallucination_change_se": change["hallucination_se"],
                   "dpo_hallucination_relative_change": pytest.approx(-33 / 67),
                   "dpo_task_accuracy_change": 0.0}
    assert headline_changes("ppo", change, 0.0)["ppo_hallucination_relative_change"] is None


def test_notebook_recipe_reads_upstream_chapters_then_the_notebooks_own_parameters():
    """A 3.3 notebook names its upstream models by a profile (and changes to it): 3.2's
    parameters make the starting model, 3.3.1's and 3.3.2's the rest, its own come last; the
    3.3 seed does not reseed 3.2's model; a chapter that is not 3.3's is refused."""
    from companion.book import load_book
    from companion.rlhf import notebook_recipe

    book = load_book()
    base = notebook_recipe("3.3.3", {}, book)
    assert base == notebook_recipe("3.3.3", {"upstream": "default"}, book)
    changed = notebook_recipe("3.3.3", {"upstream_changes": {
        "stage2_steps": 11, "questions_per_conversation": 2, "rm_steps": 5, "ppo_lr": 0.5,
        "annotator_hallucination_rate": 0.25, "seed": 9}}, book)
    assert (changed.sft.stage2_steps, changed.sft.questions_per_conversation) == (11, 2)
    assert (changed.rm_steps, changed.ppo_lr) == (5, 0.5)
    assert changed.sft.annotator_hallucination_rate == 0.25
    assert changed.sft.seed == 9 and changed.seed == 9  # every upstream chapter declares seed
    own = notebook_recipe("3.3.2", {"seed": 3, "ppo_lr": 0.25, "sft_stage2_steps": 7,
                                    "upstream_changes": {"ppo_lr": 0.5}}, book)
    assert own.seed == 3 and own.ppo_lr == 0.25 and own.sft.seed == base.sft.seed
    assert own.sft.stage2_steps == 7  # a papermill user may still name 3.2's field directly
    smoke = notebook_recipe("3.3.1", {"upstream": "smoke"}, book)
    assert smoke.sft.lm_steps == book.profile("smoke").parameters_for("3.2")["lm_steps"]
    assert smoke.scenes == base.scenes  # 3.3.1's own parameters are not upstream of itself
    with pytest.raises(ValueError, match="'3.2' is not a 3.3 chapter"):
        notebook_recipe("3.2", {}, book)
