"""Tiny random Hugging Face checkpoints (BERT and Llama) written to a folder, for fast CPU tests."""

from __future__ import annotations

from pathlib import Path

import torch

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
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + list(dict.fromkeys(words)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=ffn, max_position_embeddings=256,
                         tie_word_embeddings=tied)
    LlamaModel(config).save_pretrained(folder)
    return folder
