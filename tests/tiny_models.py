"""Small random Hugging Face checkpoints on disk, for tests.

Every helper writes a real HF directory (safetensors weights via ``save_pretrained``, a
``config.json`` and a char-level ``PreTrainedTokenizerFast``) in well under a second, so
tests exercise the same files users have without downloading anything.

- :func:`make_tiny_llama` / :func:`make_tiny_gpt2`: random models (seeded).
- :func:`make_tiny_expert`: a "fine-tune" of a base (base weights + small seeded noise),
  the realistic input of task-vector merges.
- :func:`make_tiny_lora`: a PEFT LoRA adapter over a base, with non-zero B so the delta
  is not trivially zero.
- :func:`char_tokenizer`: the tokenizer alone (char-level WordLevel, as NOTES.md describes).
- :func:`scale_layer_inputs`: Sakana's data-flow scaling done directly (forward pre-hooks),
  the reference the folded DFS export is checked against.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
_CHARS = string.digits + string.ascii_lowercase + string.ascii_uppercase + string.punctuation + " "


def _chars(n: int) -> list[str]:
    """``n`` distinct single characters, the printable ones first."""
    out = list(_CHARS[:n])
    i = 0
    while len(out) < n:  # beyond printable ASCII: Latin-1 supplement and on
        out.append(chr(0xC0 + i))
        i += 1
    return out


def char_tokenizer(vocab: int = 40, salt: int = 0):
    """A char-level ``PreTrainedTokenizerFast`` with exactly ``vocab`` tokens.

    Ids 0-3 are ``<pad> <s> </s> <unk>``, then one token per character. ``salt`` rotates
    the character-to-id assignment, giving a tokenizer of the same size with a different
    vocabulary (for "different tokenizers" tests).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if vocab <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab must exceed {len(SPECIAL_TOKENS)} special tokens, got {vocab}")
    chars = _chars(vocab - len(SPECIAL_TOKENS))
    if salt:
        k = salt % len(chars)
        chars = chars[k:] + chars[:k]
    table = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    table.update({c: i + len(SPECIAL_TOKENS) for i, c in enumerate(chars)})
    tok = Tokenizer(models.WordLevel(vocab=table, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def _save(model, tokenizer, out: Path, shard_size: int | str | None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    kwargs = {} if shard_size is None else {"max_shard_size": shard_size}
    model.save_pretrained(out, **kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def make_tiny_llama(
    dir: str | Path,
    seed: int = 0,
    hidden: int = 16,
    layers: int = 2,
    vocab: int = 40,
    shard_size: int | str | None = None,
    tie: bool = True,
    tokenizer: bool = True,
    tokenizer_salt: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Save a random ``LlamaForCausalLM`` (+ char tokenizer) to ``dir`` and return the path.

    ``shard_size`` (e.g. ``"2KB"``) forces a sharded checkpoint with an index file.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=vocab,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).to(dtype)
    tok = char_tokenizer(vocab, tokenizer_salt) if tokenizer else None
    return _save(model, tok, Path(dir), shard_size)


def make_tiny_gpt2(
    dir: str | Path,
    seed: int = 0,
    hidden: int = 16,
    layers: int = 2,
    vocab: int = 40,
    shard_size: int | str | None = None,
    tokenizer: bool = True,
) -> Path:
    """Save a random ``GPT2LMHeadModel`` (+ char tokenizer) to ``dir`` and return the path."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_embd=hidden,
        n_layer=layers,
        n_head=2,
        vocab_size=vocab,
        n_positions=64,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(cfg)
    tok = char_tokenizer(vocab) if tokenizer else None
    return _save(model, tok, Path(dir), shard_size)


def make_tiny_expert(
    base_dir: str | Path,
    dir: str | Path,
    seed: int = 1,
    scale: float = 0.02,
    shard_size: int | str | None = None,
) -> Path:
    """A "fine-tune" of ``base_dir``: every weight plus seeded Gaussian noise of std ``scale``.

    Written with the base's config and tokenizer, so it is merge-compatible with the base.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    tok = AutoTokenizer.from_pretrained(base_dir)
    return _save(model, tok, Path(dir), shard_size)


def make_tiny_lora(
    base_dir: str | Path,
    dir: str | Path,
    seed: int = 2,
    r: int = 2,
    alpha: float = 4.0,
    target_modules: tuple[str, ...] | str = ("q_proj", "v_proj", "up_proj"),
    fan_in_fan_out: bool = False,
    use_rslora: bool = False,
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
) -> Path:
    """Save a PEFT LoRA adapter over ``base_dir`` with random, non-zero A and B factors."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(target_modules) if not isinstance(target_modules, str) else target_modules,
        lora_dropout=0.0,
        fan_in_fan_out=fan_in_fan_out,
        use_rslora=use_rslora,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out)
    return out


def scale_layer_inputs(model, scales) -> None:
    """Multiply the residual stream entering decoder layer k by ``scales[k]`` (hooks)."""

    def hook(scale):
        def pre(module, args, kwargs):
            if args:
                return (args[0] * scale, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * scale}

        return pre

    for layer, s in zip(model.model.layers, scales):
        layer.register_forward_pre_hook(hook(s), with_kwargs=True)
