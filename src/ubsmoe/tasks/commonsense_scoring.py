"""Answering encoded commonsense questions with a causal LM: each choice's log-likelihood and a generated
answer (greedy or beam search) from one cached pass over the prompt, and the choice a generated text names."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ubsmoe.data.commonsense import CommonsenseExample, extract_answer
from ubsmoe.model import MoEModel
from ubsmoe.tasks.base import ForwardObserver
from ubsmoe.tasks.commonsense_encoding import ScoredQuestion


def generation_subset(count: int, cap: int, seed: str) -> list[int]:
    """The (ascending) indices of at most ``cap`` of ``count`` questions whose answers are generated, drawn
    from ``seed``; every one for ``cap`` 0."""
    if not cap or cap >= count:
        return list(range(count))
    return sorted(random.Random(seed).sample(range(count), cap))


def named_choice(example: CommonsenseExample, generated: str) -> str | None:
    """The choice a free-form generated response names: the task's LLM-Adapters pattern for a known task,
    else the first of the instruction's choices to appear; None when the instruction offers none."""
    if example.task:
        return extract_answer(example.task, generated) or None
    if not example.choices:
        return None
    found = re.search("|".join(re.escape(c) for c in sorted(example.choices, key=len, reverse=True)), generated)
    return found.group(0) if found else None


@dataclass
class Answer:
    """What a model made of a question: each choice's response log-likelihood, and its generated
    continuation (token ids, ending at end-of-sequence when it produced one)."""

    scores: list[float]
    generated: list[int]

    def likeliest(self, question: ScoredQuestion, per_char: bool = False) -> int:
        values = [s / n for s, n in zip(self.scores, question.response_chars)] if per_char else self.scores
        return max(range(len(values)), key=values.__getitem__)


@torch.inference_mode()
def score_and_generate(model: MoEModel, questions: list[ScoredQuestion], batch_size: int, max_new_tokens: int,
                       eos: int, pad: int, observe: ForwardObserver | None = None, desc: str = "",
                       num_beams: int = 1) -> list[Answer]:
    """Each question's choices scored and its answer generated from one pass over its prompt.

    ``batch_size`` prompts at a time run left-padded with the backbone's key-value cache; the cache is
    repeated once per choice to score the choices' responses (right-padded) after it, cut back, and then
    continued by greedy decoding or, with ``num_beams`` > 1, beam search (at most ``max_new_tokens``,
    stopping at ``eos``). ``observe`` sees the prompt passes (the inference FLOPs per token are those of
    reading prompts)."""
    from transformers import DynamicCache

    answers: list[Answer] = []
    for start in tqdm(range(0, len(questions), batch_size), desc=desc, leave=False, disable=None):
        chunk = questions[start:start + batch_size]
        ids, mask = _left_padded([q.prompt for q in chunk], pad)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        prompt = model.run_backbone(ids, mask, position_ids=positions, use_cache=True,
                                    cache=DynamicCache(config=model.backbone.config))
        last = prompt.last_hidden_state[:, -1:]  # (B, 1, d): predicts each response's first token
        first = model.head(last, torch.ones_like(last[..., 0], dtype=torch.bool)).log_softmax(-1).cpu()  # (B, V)
        if observe is not None:  # the prompt pass and its one projection per prompt
            observe(mask)
        cache = prompt.cache
        scores = (_score_choices(model, chunk, first, cache, mask, positions, pad)
                  if any(q.responses for q in chunk) else [[] for _ in chunk])
        if max_new_tokens == 0:  # scored only
            generated = [[] for _ in chunk]
        elif num_beams > 1:
            generated = _beam_search(model, last, cache, mask, positions, max_new_tokens, eos, num_beams)
        else:
            generated = _greedy(model, last, cache, mask, positions, max_new_tokens, eos, pad)
        answers += [Answer(s, g) for s, g in zip(scores, generated)]
    return answers


def _left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = torch.tensor(row)
        mask[i, length - len(row):] = 1
    return ids, mask


def _score_choices(model: MoEModel, chunk: list[ScoredQuestion], first: torch.Tensor, cache, mask: torch.Tensor,
                   positions: torch.Tensor, pad: int) -> list[list[float]]:
    """Sum of log-probabilities of every choice's response after its prompt's cached keys and values;
    leaves ``cache`` as it found it. first: (B, V) log-probabilities of the token after each prompt.
    Every question of ``chunk`` has at least one response."""
    rows = [(qi, response) for qi, q in enumerate(chunk) for response in q.responses]
    owner = torch.tensor([qi for qi, _ in rows])
    length = max(len(r) for _, r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    real = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, (_, response) in enumerate(rows):
        ids[i, : len(response)] = torch.tensor(response)
        real[i, : len(response)] = True
    totals = first[owner, ids[:, 0]].clone()  # each response's first token, predicted by its prompt
    if length > 1:
        cache.batch_select_indices(owner.to(model.device))
        extended = torch.cat([mask[owner], real.long()], dim=1)
        steps = positions[owner, -1:] + 1 + torch.arange(length)
        hidden = model.run_backbone(ids, extended, position_ids=steps, use_cache=True, cache=cache).last_hidden_state
        scored = F.pad(real[:, 1:], (0, 1), value=False)  # positions whose next token is a real response token
        log_probs = model.head(hidden, real.to(hidden.device), positions=scored).log_softmax(-1).cpu()
        token_scores = log_probs.gather(1, ids[:, 1:][real[:, 1:]].unsqueeze(1)).squeeze(1)
        totals.index_add_(0, scored.nonzero()[:, 0], token_scores)
        cache.crop(-length)  # back to the prompts (a negative count removes that many positions)
        first_rows = torch.tensor([0] + [len(q.responses) for q in chunk[:-1]]).cumsum(0)
        cache.batch_select_indices(first_rows.to(model.device))
    per_question = [[] for _ in chunk]
    for (qi, _), total in zip(rows, totals.tolist()):
        per_question[qi].append(total)
    return per_question


def _greedy(model: MoEModel, last: torch.Tensor, cache, mask: torch.Tensor, positions: torch.Tensor,
            max_new_tokens: int, eos: int, pad: int) -> list[list[int]]:
    """Greedy continuations after the cached prompts; each stops at ``eos`` (kept) or ``max_new_tokens``."""
    hidden, batch = last, last.shape[0]
    new = torch.empty((batch, 0), dtype=torch.long)
    done = torch.zeros(batch, dtype=torch.bool)
    for step in range(max_new_tokens):
        token = model.head(hidden, torch.ones_like(hidden[..., 0], dtype=torch.bool)).argmax(-1).cpu()  # (B,)
        token = torch.where(done, torch.full_like(token, pad), token)
        new = torch.cat([new, token.unsqueeze(1)], dim=1)
        done |= token == eos
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((batch, 1), dtype=torch.long)], dim=1)
        positions = positions[:, -1:] + 1
        hidden = model.run_backbone(token.unsqueeze(1), mask, position_ids=positions, use_cache=True,
                                    cache=cache).last_hidden_state
    results = []
    for row in new.tolist():
        results.append(row[: row.index(eos) + 1] if eos in row else row)
    return results


def _beam_search(model: MoEModel, last: torch.Tensor, cache, mask: torch.Tensor, positions: torch.Tensor,
                 max_new_tokens: int, eos: int, num_beams: int) -> list[list[int]]:
    """Beam search after the cached prompts, with the rules of Hugging Face's (length penalty 1, no early
    stopping): each step ranks the 2n best extensions of a prompt's n open beams by summed
    log-probability; an extension ending with ``eos`` among the first n is a finished continuation
    (the best n are kept, scored per token), the first n others stay open. A prompt is done once it has n
    finished ones and none of its open beams can beat the worst of them; after ``max_new_tokens`` the
    open beams compete too. The answer is the best finished continuation.
    last: (B, 1, d); mask, positions: (B, P); the cache holds the B prompts and is reordered in place."""
    batch, n = last.shape[0], num_beams
    log_probs = model.head(last, torch.ones_like(last[..., 0], dtype=torch.bool)).log_softmax(-1).cpu()  # (B, V)
    vocab = log_probs.shape[-1]
    scores = torch.zeros(batch, 1, dtype=log_probs.dtype)  # one open beam per prompt to start with
    sequences = torch.empty(batch, 0, dtype=torch.long)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    done = [False] * batch
    beams = 1
    for step in range(max_new_tokens):
        totals = (scores.unsqueeze(2) + log_probs.view(batch, beams, vocab)).view(batch, -1)  # (B, beams V)
        best, index = totals.topk(2 * n, dim=1)  # enough that n stay open after those ending in eos
        keep_scores, keep_rows, keep_tokens = [], [], []
        for q in range(batch):
            chosen = []
            for rank, (value, flat) in enumerate(zip(best[q].tolist(), index[q].tolist())):
                beam, token = divmod(flat, vocab)
                if token == eos:
                    if rank < n and not done[q]:
                        _keep_best(finished[q], (value / (step + 1), sequences[q * beams + beam].tolist() + [eos]), n)
                elif len(chosen) < n:
                    chosen.append((value, q * beams + beam, token))
            if not done[q] and len(finished[q]) >= n:  # can an open beam still beat the worst finished one?
                done[q] = min(f[0] for f in finished[q]) >= chosen[0][0] / (step + 1)
            keep_scores += [c[0] for c in chosen]
            keep_rows += [c[1] for c in chosen]
            keep_tokens += [c[2] for c in chosen]
        rows, tokens = torch.tensor(keep_rows), torch.tensor(keep_tokens)
        scores = torch.tensor(keep_scores, dtype=log_probs.dtype).view(batch, n)
        sequences = torch.cat([sequences[rows], tokens.unsqueeze(1)], dim=1)
        if step == max_new_tokens - 1 or all(done):
            break
        cache.batch_select_indices(rows.to(model.device))  # each kept beam's history: its prompt's, then its parent beam's
        mask, positions = mask[rows], positions[rows]
        beams = n
        mask = torch.cat([mask, torch.ones((batch * n, 1), dtype=torch.long)], dim=1)
        positions = positions[:, -1:] + 1
        hidden = model.run_backbone(tokens.unsqueeze(1), mask, position_ids=positions, use_cache=True,
                                    cache=cache).last_hidden_state
        log_probs = model.head(hidden, torch.ones_like(hidden[..., 0], dtype=torch.bool)).log_softmax(-1).cpu()
    for q in range(batch):
        if not done[q]:  # out of tokens: the open beams compete with the finished ones
            for hypothesis in _open_beams(scores, sequences, q, n):
                _keep_best(finished[q], hypothesis, n)
    return [max(finished[q], key=lambda h: h[0])[1] for q in range(batch)]


def _keep_best(hypotheses: list[tuple[float, list[int]]], candidate: tuple[float, list[int]], n: int) -> None:
    """Add ``candidate`` (score, tokens) to at most ``n`` hypotheses, keeping the best."""
    hypotheses.append(candidate)
    if len(hypotheses) > n:
        hypotheses.remove(min(hypotheses, key=lambda h: h[0]))


def _open_beams(scores: torch.Tensor, sequences: torch.Tensor, q: int, n: int) -> list[tuple[float, list[int]]]:
    """Prompt q's open beams as (log-probability per token, tokens). scores: (B, n); sequences: (B n, L)."""
    return [(scores[q, b].item() / sequences.shape[1], sequences[q * n + b].tolist()) for b in range(n)]
