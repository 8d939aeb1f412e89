"""Image-grounded text generation (3.1): the seed's ``generation_loss`` and caption decoding.

The sequence a causal VLM reads is ``[vision tokens] <s> caption </s>``: the projected image
features first, then the caption. The loss is next-token cross-entropy on the caption
(and its closing ``</s>``) only: labels are -100 on the vision tokens, the opening ``<s>``
and the padding. Labels are given *unshifted*, aligned with the inputs; the model shifts
them once inside its loss (logits at position t predict the label at t + 1). Shifting here
as well would train every token to predict the one two steps ahead.

The model is any ``LlavaForConditionalGeneration`` (vision encoder, connector = projector,
causal LM), the same class instruction tuning uses in 3.2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from companion.batching import IGNORE_INDEX, pad_examples


def _caption_start(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def caption_inputs(tokenizer, captions: Sequence[str], n_image_tokens: int, image_id: int,
                   max_length: int = 128) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``labels`` for ``[image] <s> caption </s>``.

    Right-padded; labels equal the ids on caption tokens and the closing ``</s>``, -100
    everywhere else. A caption that would not fit in ``max_length`` raises an error naming
    it (the vision tokens are never cut). A tokenizer without a bos token (many
    checkpoints' have none) starts the caption right after the vision tokens.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("caption_inputs needs a tokenizer with an eos token to end a caption")
    start = _caption_start(tokenizer)
    if not captions:
        raise ValueError("caption_inputs got no captions")

    examples = []
    for index, caption in enumerate(captions):
        text = tokenizer(caption, add_special_tokens=False)["input_ids"]
        if not text:
            raise ValueError(f"caption {index} ({caption!r}) encodes to no tokens: "
                             "nothing to learn")
        ids = [image_id] * n_image_tokens + start + text + [tokenizer.eos_token_id]
        if len(ids) > max_length:
            raise ValueError(f"caption {index} needs {len(ids)} tokens with the {n_image_tokens} "
                             f"vision tokens, more than max_length={max_length}")
        labels = [IGNORE_INDEX] * (n_image_tokens + len(start)) + text + [tokenizer.eos_token_id]
        examples.append({"input_ids": ids, "labels": labels})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pad_examples(examples, pad)


def generation_loss(model, images: torch.Tensor, texts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The seed's ``generation_loss``: vision features -> connector -> vision tokens placed
    before the caption tokens of the causal LM; autoregressive loss on the caption only.

    ``images``: (B, 3, H, W) pixel values; ``texts``: the output of :func:`caption_inputs`.
    Inside the model, the vision tower encodes the images, the projector turns each patch
    feature into a vision token, the tokens replace the image placeholders, and the LM's
    cross-entropy is averaged over the label positions that are not -100.
    """
    for key in ("input_ids", "attention_mask", "labels"):
        if key not in texts:
            raise KeyError(f"generation_loss: texts[{key!r}] is missing; "
                           "build it with caption_inputs")
    if images.shape[0] != texts["input_ids"].shape[0]:
        raise ValueError(f"generation_loss: {images.shape[0]} images but "
                         f"{texts['input_ids'].shape[0]} captions")
    if not (texts["labels"] != IGNORE_INDEX).any():
        raise ValueError("generation_loss: every label is -100; the batch has no caption token")
    return model(input_ids=texts["input_ids"], attention_mask=texts["attention_mask"],
                 pixel_values=images, labels=texts["labels"]).loss


@torch.no_grad()
def generate_captions(model, tokenizer, images: torch.Tensor, n_image_tokens: int, image_id: int,
                      max_new_tokens: int = 48, do_sample: bool = False,
                      temperature: float = 1.0, seed: int | None = None) -> list[str]:
    """Captions for ``images``, greedy (``do_sample=False``) or sampled at ``temperature``."""
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature={temperature} must be positive when sampling")
    model.eval()
    device = next(model.parameters()).device
    prompt = torch.tensor([[image_id] * n_image_tokens + _caption_start(tokenizer)] * len(images))
    if seed is not None:
        torch.manual_seed(seed)
    output = model.generate(
        input_ids=prompt.to(device), attention_mask=torch.ones_like(prompt).to(device),
        pixel_values=images.to(device), max_new_tokens=max_new_tokens, do_sample=do_sample,
        temperature=temperature if do_sample else None, top_k=None, top_p=None,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    captions = []
    for row in output[:, prompt.shape[1]:].tolist():
        if tokenizer.eos_token_id in row:
            row = row[:row.index(tokenizer.eos_token_id)]
        captions.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return captions
