"""A minimal batched greedy evaluator for zoo models.

Used while training (validation) and for zoo experiments on merged weights. Prompts are
grouped by length, so no padding is needed and no attention mask can go wrong; each group
is decoded greedily, recomputing the (very short) sequence at every step, and an item is
correct when its continuation up to EOS equals the target exactly. The fitness backends
score the same way (exact match after stripping, generation stopped at EOS).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from .tasks import Example


def encode_prompt(prompt: str, vocab: dict[str, int], bos_id: int) -> list[int]:
    return [bos_id] + [vocab[ch] for ch in prompt]


def greedy_correct(
    model,
    examples: Sequence[Example],
    vocab: dict[str, int],
    *,
    bos_id: int,
    eos_id: int,
    max_new_tokens: int | None = None,
    batch_size: int = 512,
) -> list[bool]:
    """Per example: does the greedy continuation (up to EOS) equal the target?"""
    import torch

    inv = {i: t for t, i in vocab.items()}
    device = next(model.parameters()).device
    groups: dict[int, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        groups[len(ex.prompt)].append(i)
    out = [False] * len(examples)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for _, idxs in sorted(groups.items()):
            for start in range(0, len(idxs), batch_size):
                chunk = idxs[start : start + batch_size]
                ids = torch.tensor(
                    [encode_prompt(examples[i].prompt, vocab, bos_id) for i in chunk],
                    device=device,
                )
                steps = max_new_tokens or max(len(examples[i].target) for i in chunk) + 1
                done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
                gen = []
                for _ in range(steps):
                    logits = model(input_ids=ids, use_cache=False).logits[:, -1, :]
                    nxt = logits.argmax(-1)
                    nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                    gen.append(nxt)
                    done |= nxt == eos_id
                    if bool(done.all()):
                        break
                    ids = torch.cat([ids, nxt[:, None]], dim=1)
                toks = torch.stack(gen, 1).tolist()
                for row, i in zip(toks, chunk):
                    text = []
                    for t in row:
                        if t == eos_id:
                            break
                        text.append(inv.get(t, "\ufffd") if t >= 4 else "")
                    out[i] = "".join(text).strip() == examples[i].target.strip()
    model.train(was_training)
    return out


def accuracy(model, examples: Sequence[Example], vocab: dict[str, int], **kw) -> float:
    """Exact-match accuracy in percent."""
    res = greedy_correct(model, examples, vocab, **kw)
    return 100.0 * sum(res) / max(1, len(res))
