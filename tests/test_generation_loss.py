"""Image-grounded generation: labels, the single shift, decoding, a learning step."""

import pytest
import torch

from companion.losses.generation import (IGNORE_INDEX, caption_inputs, generate_captions,
                                         generation_loss)
from companion.models import TinyClipConfig, build_clip
from companion.tokenizer import train_tokenizer, world_corpus
from companion.train import TrainConfig, train
from companion.lm import TinyLMConfig, build_lm
from companion.tokenizer import image_token_id
from companion.vlm import build_vlm
from companion.world import make_scenes, render_scene, scene_captions

N_IMAGE = 4


@pytest.fixture(scope="module")
def setup():
    tokenizer = train_tokenizer(world_corpus(40, seed=2), vocab_size=400)
    clip, processor, _ = build_clip(tokenizer, sizes=TinyClipConfig(
        image_size=16, patch_size=8, vision_width=32, vision_layers=1, text_width=32,
        text_layers=1, heads=2, projection_dim=16), seed=0)
    lm, _ = build_lm(tokenizer, sizes=TinyLMConfig(hidden_size=32, layers=1, heads=2,
                                                   intermediate_size=64), seed=0)
    return build_vlm(clip, lm, tokenizer), processor, tokenizer


def test_labels_are_minus_100_exactly_off_the_caption(setup):
    _, _, tokenizer = setup
    captions = ["a small red circle at the top left.", "one shape: a large blue square."]
    batch = caption_inputs(tokenizer, captions, N_IMAGE, image_token_id(tokenizer))
    for row, caption in enumerate(captions):
        text = tokenizer(caption, add_special_tokens=False)["input_ids"]
        ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
        n = N_IMAGE + 2 + len(text)
        assert ids[:N_IMAGE] == [image_token_id(tokenizer)] * N_IMAGE
        assert ids[N_IMAGE] == tokenizer.bos_token_id
        assert labels[:N_IMAGE + 1] == [IGNORE_INDEX] * (N_IMAGE + 1)       # image, <s>
        assert labels[N_IMAGE + 1:n] == text + [tokenizer.eos_token_id]     # caption, </s>
        assert labels[n:] == [IGNORE_INDEX] * (len(labels) - n)              # padding
        assert labels[N_IMAGE + 1:n] == ids[N_IMAGE + 1:n]                   # not shifted here
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (len(ids) - n)


def test_loss_is_shifted_exactly_once(setup):
    model, processor, tokenizer = setup
    scenes = make_scenes(2, seed=1)
    images = processor(images=[render_scene(s, 16) for s in scenes],
                       return_tensors="pt")["pixel_values"]
    texts = caption_inputs(tokenizer, [scene_captions(s)[0] for s in scenes], N_IMAGE,
                           image_token_id(tokenizer))
    loss = generation_loss(model, images, texts)
    logits = model(input_ids=texts["input_ids"], attention_mask=texts["attention_mask"],
                   pixel_values=images).logits.double()
    once = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1),
                                             texts["labels"][:, 1:].flatten())
    unshifted = torch.nn.functional.cross_entropy(logits.flatten(0, 1), texts["labels"].flatten())
    twice = torch.nn.functional.cross_entropy(logits[:, :-2].flatten(0, 1),
                                              texts["labels"][:, 2:].flatten())
    assert torch.allclose(loss.double(), once, atol=1e-5)
    assert not torch.allclose(loss.double(), unshifted, atol=1e-3)
    assert not torch.allclose(loss.double(), twice, atol=1e-3)


def test_a_few_steps_lower_the_loss_and_decoding_works(setup):
    model, processor, tokenizer = setup
    scenes = make_scenes(4, seed=3)
    images = processor(images=[render_scene(s, 16) for s in scenes],
                       return_tensors="pt")["pixel_values"]
    texts = caption_inputs(tokenizer, [scene_captions(s)[0] for s in scenes], N_IMAGE,
                           image_token_id(tokenizer))
    before = generation_loss(model, images, texts).item()
    train(model, lambda _: generation_loss(model, images, texts), lambda s: None,
          TrainConfig(steps=30, lr=3e-3, log_every=0), device="cpu")
    assert generation_loss(model, images, texts).item() < 0.7 * before
    greedy = generate_captions(model, tokenizer, images, N_IMAGE, image_token_id(tokenizer),
                               max_new_tokens=8)
    assert greedy == generate_captions(model, tokenizer, images, N_IMAGE,
                                       image_token_id(tokenizer), max_new_tokens=8)
    sampled = [generate_captions(model, tokenizer, images, N_IMAGE, image_token_id(tokenizer),
                                 max_new_tokens=8, do_sample=True, temperature=1.5, seed=k)
               for k in range(3)]
    assert len(sampled[0]) == 4 and all(isinstance(c, str) for c in sampled[0])
    assert sampled[0] == generate_captions(model, tokenizer, images, N_IMAGE,
                                           image_token_id(tokenizer), max_new_tokens=8,
                                           do_sample=True, temperature=1.5, seed=0)
    with pytest.raises(ValueError, match="temperature=0"):
        generate_captions(model, tokenizer, images, N_IMAGE, image_token_id(tokenizer),
                          do_sample=True, temperature=0)


def test_bad_inputs_are_reported(setup):
    model, _, tokenizer = setup
    image_id = image_token_id(tokenizer)
    with pytest.raises(ValueError, match="no captions"):
        caption_inputs(tokenizer, [], N_IMAGE, image_id)
    with pytest.raises(ValueError, match="caption 1 .*no tokens"):
        caption_inputs(tokenizer, ["a red circle.", ""], N_IMAGE, image_id)
    with pytest.raises(ValueError, match="caption 0 needs .* max_length=6"):
        caption_inputs(tokenizer, ["a red circle."], N_IMAGE, image_id, max_length=6)
    texts = caption_inputs(tokenizer, ["a red circle."], N_IMAGE, image_id)
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        generation_loss(model, torch.zeros(2, 3, 16, 16), texts)
    with pytest.raises(KeyError, match="labels"):
        generation_loss(model, torch.zeros(1, 3, 16, 16), {"input_ids": texts["input_ids"],
                                                         "attention_mask": texts["attention_mask"]})
    texts["labels"][:] = IGNORE_INDEX
    with pytest.raises(ValueError, match="no caption token"):
        generation_loss(model, torch.zeros(1, 3, 16, 16), texts)


def test_caption_quality_scores_facts_and_hallucinations():
    from companion.evaluate import caption_quality
    from companion.world import canonical_caption

    scenes = make_scenes(6, seed=21)
    perfect = caption_quality(scenes, [canonical_caption(s) for s in scenes])
    assert perfect == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "exact": 1.0,
                       "hallucination_rate": 0.0}
    invented = caption_quality(scenes, ["a large pink star at the center."] * len(scenes))
    assert invented["hallucination_rate"] == 1.0 and invented["exact"] == 0.0
    assert invented["precision"] < 0.5
    empty = caption_quality(scenes, [""] * len(scenes))
    assert empty["recall"] == 0.0 and empty["exact"] == 0.0
    with pytest.raises(ValueError, match="6 scenes but 5 captions"):
        caption_quality(scenes, [""] * 5)


def test_a_tokenizer_without_bos_starts_the_caption_after_the_vision_tokens():
    from foreign_tokenizers import foreign_tokenizer

    from companion.tokenizer import prepare_tokenizer
    from companion.tokenizer import image_token_id

    tokenizer = foreign_tokenizer()
    prepare_tokenizer(tokenizer)
    assert tokenizer.bos_token_id is None
    out = caption_inputs(tokenizer, ["a red circle."], 3, image_token_id(tokenizer))
    text = tokenizer("a red circle.", add_special_tokens=False)["input_ids"]
    assert out["input_ids"][0].tolist() == [image_token_id(tokenizer)] * 3 + text + [
        tokenizer.eos_token_id]
    assert out["labels"][0].tolist() == [-100] * 3 + text + [tokenizer.eos_token_id]
