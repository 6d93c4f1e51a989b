"""xfast.data.text.Tokenize (the Rust backend called directly) against the HF tokenizer call."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from tests.data_fixtures import WORDS, make_tokenizer
from xfast.data.text import Tokenize


def _wordpiece():
    """BERT-like: WordPiece, lower-casing, [CLS] ... [SEP] added by a template post-processor."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    tok.train_from_iterator([" ".join(WORDS)] * 3, trainers.WordPieceTrainer(vocab_size=80, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls),
                                                                                                ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]")


def _byte_bpe():
    """GPT-2/RoBERTa-like byte-level BPE with its pad token at a high id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([" ".join(WORDS)] * 3, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _texts(seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, size=int(n))) for n in rng.integers(1, 40, size=50)]  # some truncated
    return texts + ["", "  ", "Caf\u00e9 D\u00f6G  runs!", "x" * 300, "a\tb\nc"]


@pytest.mark.parametrize("make", [make_tokenizer, _wordpiece, _byte_bpe], ids=["wordlevel", "wordpiece", "bytebpe"])
@pytest.mark.parametrize("sides", [("right", "right"), ("left", "left")], ids=["right", "left"])
@pytest.mark.parametrize("max_length", [2, 7, 24])  # 2: no room beside [CLS] [SEP]
def test_same_ids_and_mask_as_the_hf_call(make, sides, max_length):
    tokenizer = getattr(make, "__wrapped__", make)()  # not the cached one the other tests share
    tokenizer.padding_side, tokenizer.truncation_side = sides
    settings = (tokenizer.backend_tokenizer.truncation, tokenizer.backend_tokenizer.padding)
    tokenize = Tokenize(tokenizer, max_length)
    assert tokenize.backend is not None
    # the HF tokenizer itself is left as it was (the backend is a copy)
    assert (tokenizer.backend_tokenizer.truncation, tokenizer.backend_tokenizer.padding) == settings
    texts = _texts(max_length)
    expected = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    for tok in (tokenize, pickle.loads(pickle.dumps(tokenize))):  # as data workers receive it
        input_ids, attention_mask = tok(texts)
        assert input_ids.dtype == attention_mask.dtype == torch.long
        assert torch.equal(input_ids, expected["input_ids"]) and torch.equal(attention_mask, expected["attention_mask"])


def test_empty_batch():
    input_ids, attention_mask = Tokenize(make_tokenizer(), 5)([])
    assert input_ids.shape == attention_mask.shape == (0, 5)
