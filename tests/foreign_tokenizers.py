"""Tokenizers that look like real checkpoints' rather than the world's: other special tokens,
no ``<image>`` token, and either a ChatML template without ``{% generation %}`` blocks (as
Qwen's) or no template at all (as many base models). Shared by the unit and notebook tests."""

from __future__ import annotations

CHATML = ("{% for m in messages %}"
          "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# keeps only the last assistant reply's text (as templates that strip earlier "thinking" do):
# an earlier reply renders differently once a later turn follows it
REWRITING = ("{% for m in messages %}"
             "{% if m['role'] == 'assistant' and not loop.last %}"
             "{{ '<|im_start|>assistant\n...<|im_end|>\n' }}"
             "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
             "{% endif %}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def foreign_tokenizer(template: str | None = CHATML, n_scenes: int = 50):
    """A byte-level BPE on the world's text with ChatML's special tokens, eos
    ``<|endoftext|>``, no pad and no ``<image>``, and ``template`` as its chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from companion.tokenizer import world_corpus

    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(world_corpus(n_scenes), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>")
    tokenizer.chat_template = template
    return tokenizer


def save_foreign_lm(folder, template: str | None = CHATML, seed: int = 1):
    """A tiny Llama for :func:`foreign_tokenizer` saved with it (the tokenizer as shipped:
    no ``<image>``, no pad), as a hub checkpoint would be."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = foreign_tokenizer(template)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
