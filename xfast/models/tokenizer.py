"""Tokenizers for the text tower: local HF folders, or a tiny WordPiece trained offline for random towers."""
from __future__ import annotations

import os
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

# Ids 0..4, matching the tiny text presets (pad 0, [CLS] 2 = bos, [SEP] 3 = eos).
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str, *, lowercase: bool = True,
                    max_length: int = 64) -> PreTrainedTokenizerFast:
    """Train a BERT-style WordPiece tokenizer on `texts`, save it to `out_dir` (HF format) and return it.

    Encodings are "[CLS] text [SEP]" and carry only input_ids / attention_mask (what every text
    tower takes); max_length becomes model_max_length (the tiny presets take 64 positions).
    """
    texts = [t for t in texts]
    if not texts:
        raise ValueError("train_tokenizer needs at least one text")
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("train_tokenizer: every text must be a str")
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                        show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", bos_token="[CLS]", eos_token="[SEP]", model_max_length=max_length,
        model_input_names=["input_ids", "attention_mask"])
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def load_tokenizer(source) -> PreTrainedTokenizerBase:
    """AutoTokenizer from a local folder only.

    source: a ModelConfig (its text.tokenizer, else text.pretrained), a TowerConfig, a folder
    written by ContrastiveModel.save_pretrained (its text/ subfolder), or a tokenizer folder.
    """
    from xfast.models.config import ModelConfig, TowerConfig
    if isinstance(source, ModelConfig):
        source = source.text
    if isinstance(source, TowerConfig):
        folder = source.tokenizer or source.pretrained
        if folder is None:
            raise ValueError("model.text.tokenizer is not set and the text tower is random (preset "
                             f"{source.preset!r}): train one with xfast.models.train_tokenizer(texts, vocab_size, "
                             "out_dir) and set model.text.tokenizer to out_dir")
    elif isinstance(source, (str, os.PathLike)):
        folder = os.fspath(source)
        if os.path.isfile(os.path.join(folder, "xfast_config.json")):
            folder = os.path.join(folder, "text")
    else:
        raise TypeError(f"load_tokenizer takes a ModelConfig, TowerConfig or folder path, got {type(source).__name__}")
    if not os.path.isdir(folder):
        raise ValueError(f"tokenizer folder {folder!r} does not exist")
    if not any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "vocab.txt", "vocab.json")):
        raise ValueError(f"{folder!r} holds no tokenizer (tokenizer.json, vocab.txt or vocab.json)")
    return AutoTokenizer.from_pretrained(folder)


def vocab_facts(tokenizer: PreTrainedTokenizerBase) -> dict:
    """Vocabulary size and special ids a random text tower must agree with."""
    return {"size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id,
            "eos_token_id": tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id}

