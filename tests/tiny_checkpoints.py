"""Tiny random Hugging Face checkpoints (BERT, Llama and native MoE models) written to a folder, for fast CPU tests."""

from __future__ import annotations

from pathlib import Path

import torch

from ubsmoe.model.backbones import NATIVE_MOE_TYPES

WORDS = ("the a of to in and is was for on with by at from bank rates market shares profit film music award "
         "star show game match team goal win cup election minister party vote government phone software "
         "computer internet users network technology court police economy growth sales year new says").split()


def write_tiny_bert(folder: Path, hidden: int = 32, layers: int = 2, ffn: int = 64, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(WORDS))}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=ffn, max_position_embeddings=128, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(folder)
    return folder


# What the commonsense prompts and responses are made of, so that a tiny decoder reads them as words
PROMPT_WORDS = ("below is an instruction that describes a task write response appropriately completes the request "
                "please choose correct answer to question true false or with following # : . , ? / _ "
                "answer1 answer2 answer3 answer4 answer5 option1 option2 solution1 solution2 format "
                "Below Write Instruction Response Please Answer1 Answer2 Option1 Option2 Solution1 Solution2 "
                "Answer").split()


def write_tiny_llama(folder: Path, hidden: int = 32, layers: int = 2, ffn: int = 64, seed: int = 0,
                     words: tuple[str, ...] = WORDS, tied: bool = False, bos: bool = False) -> Path:
    """A tiny random Llama; ``tied``: the LM head is the embedding matrix (as in SmolLM2); ``bos``: the
    tokenizer starts every text with <s> (as Llama's)."""
    from transformers import LlamaConfig, LlamaModel

    vocab = write_word_tokenizer(folder, words, bos)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=ffn, max_position_embeddings=256,
                         tie_word_embeddings=tied)
    LlamaModel(config).save_pretrained(folder)
    return folder


def write_word_tokenizer(folder: Path, words: tuple[str, ...], bos: bool = False) -> dict[str, int]:
    """A whole-word tokenizer with <unk>, <s> and </s> (``bos``: every text starts with <s>); its vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + list(dict.fromkeys(words)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    return vocab


NATIVE_MOE_FAMILIES = NATIVE_MOE_TYPES  # every family ubsmoe reads, from its own table


def write_tiny_moe(folder: Path, model_type: str, words: tuple[str, ...] = WORDS, hidden: int = 16, layers: int = 2,
                   experts: int = 4, top_k: int = 2, seed: int = 0, renormalise: bool = False) -> Path:
    """A tiny random native MoE causal LM (OLMoE, Mixtral, Qwen2-MoE with its shared expert, Qwen3-MoE),
    a few thousand parameters, saved as ``from_pretrained`` reads it; ``renormalise``: norm_topk_prob."""
    import transformers

    vocab = write_word_tokenizer(folder, words, bos=True)
    common = dict(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                  num_key_value_heads=2, num_experts_per_tok=top_k, max_position_embeddings=256, bos_token_id=1,
                  eos_token_id=2, pad_token_id=None, tie_word_embeddings=False)
    configs = {
        "olmoe": lambda: transformers.OlmoeConfig(**common, intermediate_size=32, num_experts=experts,
                                                  norm_topk_prob=renormalise),
        "mixtral": lambda: transformers.MixtralConfig(**common, intermediate_size=32, num_local_experts=experts),
        "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**common, intermediate_size=32, moe_intermediate_size=8,
                                                         shared_expert_intermediate_size=32, num_experts=experts,
                                                         norm_topk_prob=renormalise),
        "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**common, intermediate_size=32, moe_intermediate_size=8,
                                                         num_experts=experts, norm_topk_prob=renormalise),
    }
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(configs[model_type]())
    with torch.no_grad():  # random routers and experts large enough that routing and the experts matter
        for name, p in model.named_parameters():
            if "mlp" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(folder)
    return folder
