"""A real character-level tokenizer for the zoo models.

The zoo needs a tokenizer that transformers (``AutoTokenizer``), vLLM, mergekit and lm-eval
all load without custom code, so it is a plain ``tokenizers`` pipeline wrapped in
``PreTrainedTokenizerFast``: a WordLevel model over single characters, a pre-tokenizer that
splits every character, a Fuse decoder (so decoding joins characters without spaces) and a
``<s> $A`` post-processor, so every encoded prompt starts with BOS exactly like the
sequences the zoo trains on. ``<pad>`` is id 0, ``<s>`` id 1, ``</s>`` id 2.
"""

from __future__ import annotations

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)


def build_vocab(symbols: str) -> dict[str, int]:
    """Token -> id: the four special tokens first, then ``symbols`` in order (no duplicates)."""
    assert len(set(symbols)) == len(symbols), "duplicate symbols"
    assert not any(c.isspace() for c in symbols), "whitespace is not a zoo symbol"
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in symbols:
        vocab[ch] = len(vocab)
    return vocab


def make_tokenizer(symbols: str, model_max_length: int = 64):
    """A ``PreTrainedTokenizerFast`` over single characters of ``symbols``.

    Encoding ``"ab>"`` gives ``[<s>, a, b, >]``; decoding with ``skip_special_tokens``
    gives back ``"ab>"``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = build_vocab(symbols)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # one token per character: split on the empty pattern keeping each char isolated
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A $B",
        special_tokens=[(BOS, vocab[BOS])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=model_max_length,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )

