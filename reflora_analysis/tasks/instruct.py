r"""Instruction-style fine-tuning and answer scoring for causal LMs (the LLM-Adapters layout,
as ``causal-lm`` in ``llm.py``), for any Hugging Face tokenizer (or ``text.ByteTokenizer``).

Examples
    :func:`build_instruction_example` -> ``input_ids`` = prompt tokens + answer tokens (+ EOS),
    ``labels`` = -100 on the prompt tokens, so the loss is on the answer only. The prompt and
    the answer are tokenised separately and concatenated, so the boundary is exact.
    :func:`chat_prompt` puts an instruction in the tokenizer's chat template;
    :func:`collate_examples` right-pads examples into a batch.

Scoring
    :func:`answer_scores` scores each candidate answer by its total log-likelihood given the
    prompt, ``sum_k log p(answer_k | prompt, answer_<k)`` over its tokens (by default without
    EOS, as multiple-choice scoring in lm-evaluation-harness does);
    :func:`answer_accuracy` counts the prompts whose best candidate is the gold one.

    Why no EOS by default when scoring: the instruct model answers in sentences, so
    p(``<|im_end|>`` | a bare one-word answer) is small and differs between candidates, and it
    swamps the answer itself. SmolLM2 zero-shot, "What is the capital of X?" for France,
    Germany, Italy against ``Paris``/``Berlin``/``Rome``: 3/3 right without EOS, 2/3 with it
    (the EOS terms make ``Paris`` win for Germany). After fine-tuning on ``answer + EOS``
    (:func:`build_instruction_example`'s default), ``add_eos=True`` is the matching score.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor
from torch.nn import functional as F

from .text import ByteTokenizer, encode_ids

__all__ = ["chat_prompt", "padding_token_id", "build_instruction_example", "collate_examples", "answer_loss",
           "answer_scores", "answer_accuracy", "Candidates"]


def chat_prompt(tokenizer, user_text: str, system: str | None = None) -> str:
    """``user_text`` in the tokenizer's chat template, ending where the assistant's answer starts
    (``add_generation_prompt``). A tokenizer without a template gets ``user_text`` unchanged."""
    if isinstance(tokenizer, ByteTokenizer) or not getattr(tokenizer, "chat_template", None):
        return user_text
    messages = ([{"role": "system", "content": system}] if system is not None else [])
    messages.append({"role": "user", "content": user_text})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _eos_id(tokenizer) -> int | None:
    return tokenizer.eos_token_id


def padding_token_id(tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its EOS token."""
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither a pad nor an EOS token to pad with")
    return int(pad)


def build_instruction_example(tokenizer, prompt: str, answer: str, *, add_eos: bool = True,
                              max_length: int | None = None) -> dict[str, Tensor]:
    """One training example: ``input_ids`` = tokens(prompt) + tokens(answer) [+ EOS],
    ``attention_mask`` all ones, ``labels`` = -100 on the prompt tokens and the token ids on
    the answer tokens (loss on the answer only). 1-D long tensors.

    The prompt is tokenised with the tokenizer's special tokens (its BOS, if it adds one), the
    answer without; the two are concatenated, so the label boundary is exact. Pass a
    chat-formatted prompt (:func:`chat_prompt`) for an instruct model. ``max_length``: the
    prompt is cut from the left so the answer survives (as ``causal-lm`` does).
    """
    prompt_ids = encode_ids(tokenizer, prompt)
    answer_ids = encode_ids(tokenizer, answer, add_special_tokens=False)
    if add_eos:
        eos = _eos_id(tokenizer)
        if eos is None:
            raise ValueError("add_eos=True but the tokenizer has no EOS token")
        answer_ids = answer_ids + [int(eos)]
    if not answer_ids:
        raise ValueError(f"answer {answer!r} encodes to no tokens")
    if max_length is not None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        answer_ids = answer_ids[:max_length - 1]
        prompt_ids = prompt_ids[-(max_length - len(answer_ids)):]  # cut from the left
    if not prompt_ids:
        raise ValueError("the prompt encodes to no tokens: the first answer token would have no context")
    ids = torch.tensor(prompt_ids + answer_ids, dtype=torch.long)
    labels = ids.clone()
    labels[:len(prompt_ids)] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def collate_examples(examples: Sequence[dict[str, Tensor]], pad_id: int) -> dict[str, Tensor]:
    """Right-pad examples of :func:`build_instruction_example` into a batch (labels -100 and
    mask 0 on the padding)."""
    if not examples:
        raise ValueError("no examples to collate")
    width = max(int(e["input_ids"].numel()) for e in examples)
    input_ids = torch.full((len(examples), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, e in enumerate(examples):
        n = int(e["input_ids"].numel())
        input_ids[i, :n] = e["input_ids"]
        mask[i, :n] = e["attention_mask"]
        labels[i, :n] = e["labels"]
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def answer_loss(model, batch: dict[str, Tensor]) -> Tensor:
    """Mean next-token cross-entropy over the labelled tokens of a batch of
    :func:`collate_examples`: ``mean over answer tokens k of -log p(token_k | tokens_<k)``
    (logits at position ``k - 1`` against ``labels[k]``; ``-100`` labels ignored), in float32."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                           batch["labels"][:, 1:].reshape(-1), ignore_index=-100)


def _token_log_likelihoods(model, batch: dict[str, Tensor]) -> Tensor:
    """Sum over the labelled tokens of log p(token | preceding tokens), one value per row."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    target = batch["labels"][:, 1:]
    keep = target != -100
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * keep).sum(dim=1)


Candidates = Union[Sequence[str], Sequence[Sequence[str]]]


def _per_prompt_candidates(prompts: Sequence[str], candidate_answers: Candidates) -> list[list[str]]:
    if not candidate_answers:
        raise ValueError("no candidate answers")
    if all(isinstance(c, str) for c in candidate_answers):
        return [list(candidate_answers) for _ in prompts]  # one shared candidate list
    if len(candidate_answers) != len(prompts):
        raise ValueError(f"{len(candidate_answers)} candidate lists for {len(prompts)} prompts")
    out = [list(c) for c in candidate_answers]
    if any(not c for c in out):
        raise ValueError("a prompt has no candidate answers")
    return out


def answer_scores(model, tokenizer, prompts: Sequence[str], candidate_answers: Candidates, *,
                  add_eos: bool = False, batch_size: int = 16, max_length: int | None = None) -> list[list[float]]:
    """Total log-likelihood of every candidate answer given its prompt: ``scores[i][j]`` for
    prompt ``i``, candidate ``j``. ``candidate_answers``: one list shared by all prompts, or
    one list per prompt. Token sums, not means (a longer answer pays for every token);
    ``add_eos=True`` adds log p(EOS | prompt, answer) (module docstring). Padding and batching
    do not change the values (right padding, causal attention). When every candidate is one
    token and ``add_eos`` is False, one forward per prompt scores them all."""
    per_prompt = _per_prompt_candidates(prompts, candidate_answers)
    pad = padding_token_id(tokenizer)
    device = next(model.parameters()).device
    token_ids = [[encode_ids(tokenizer, a, add_special_tokens=False) for a in cands] for cands in per_prompt]
    single = not add_eos and all(len(ids) == 1 for row in token_ids for ids in row)
    if single:  # one forward per prompt: the candidates' log-probabilities at its last position
        flat = []
        for p, cands in zip(prompts, per_prompt):
            ex = build_instruction_example(tokenizer, p, cands[0], add_eos=False, max_length=max_length)
            ids = ex["input_ids"][:-1]
            flat.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    else:
        flat = [build_instruction_example(tokenizer, p, a, add_eos=add_eos, max_length=max_length)
                for p, cands in zip(prompts, per_prompt) for a in cands]
    values: list[float] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(flat), batch_size):
                batch = collate_examples(flat[start:start + batch_size], pad)
                batch = {k: v.to(device) for k, v in batch.items()}
                if not single:
                    values.extend(_token_log_likelihoods(model, batch).tolist())
                    continue
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                last = batch["attention_mask"].sum(1) - 1
                logp = F.log_softmax(logits[torch.arange(len(last), device=device), last].float(), dim=-1)
                for row, k in zip(logp, range(start, start + len(last))):
                    values.extend(row[[ids[0] for ids in token_ids[k]]].tolist())
    finally:
        model.train(was_training)
    scores, k = [], 0
    for cands in per_prompt:
        scores.append(values[k:k + len(cands)])
        k += len(cands)
    return scores


def answer_accuracy(model, tokenizer, prompts: Sequence[str], candidate_answers: Candidates,
                    gold: Sequence[Union[int, str]], **kwargs) -> float:
    """Fraction of prompts whose highest-likelihood candidate (:func:`answer_scores`) is the
    gold one. ``gold[i]``: the index of the right candidate, or the candidate string itself.
    Ties go to the first candidate. ``kwargs`` as :func:`answer_scores`."""
    if len(gold) != len(prompts):
        raise ValueError(f"{len(gold)} gold answers for {len(prompts)} prompts")
    if not prompts:
        raise ValueError("no prompts")
    per_prompt = _per_prompt_candidates(prompts, candidate_answers)
    scores = answer_scores(model, tokenizer, prompts, per_prompt, **kwargs)
    correct = 0
    for cands, row, g in zip(per_prompt, scores, gold):
        if isinstance(g, str):
            if g not in cands:
                raise ValueError(f"gold answer {g!r} is not among the candidates {cands}")
            g = cands.index(g)
        elif not 0 <= int(g) < len(cands):
            raise ValueError(f"gold index {g} out of range for {len(cands)} candidates")
        best = max(range(len(row)), key=lambda j: (row[j], -j))
        correct += int(best == int(g))
    return correct / len(prompts)
