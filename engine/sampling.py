"""Token sampling: penalties, temperature, top-k, top-p, min-p, seeded.

The order follows common practice: repetition penalty, presence and
frequency penalties, then temperature, top-k, top-p and min-p truncation,
then a draw from a generator seeded per request, so the same request with
the same seed yields the same tokens. Temperature 0 is greedy (penalties
still apply).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """Per-request sampling state: the generator and token counts."""

    def __init__(
        self,
        params: SamplingParams,
        vocab_size: int,
        prompt: Sequence[int],
        device: torch.device | str = "cpu",
    ) -> None:
        self.params = params
        device = torch.device(device)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(params.seed)
        self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        if prompt:
            self.seen[torch.as_tensor(list(prompt), device=device)] = True

    def penalize(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        if p.repetition_penalty != 1.0:
            picked = logits[self.seen]
            logits = logits.clone()
            logits[self.seen] = torch.where(
                picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty
            )
        if p.presence_penalty or p.frequency_penalty:
            logits = (
                logits
                - p.presence_penalty * (self.counts > 0).float()
                - p.frequency_penalty * self.counts
            )
        return logits

    def truncate(self, logits: torch.Tensor) -> torch.Tensor:
        """Temperature-scaled logits with -inf outside top-k / top-p / min-p."""
        p = self.params
        logits = logits / p.temperature
        if 0 < p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
            # Keep the smallest prefix whose mass reaches top_p (always >= 1 token).
            drop = (cum - torch.softmax(sorted_logits, dim=-1)) >= p.top_p
            logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
        if p.min_p > 0.0:
            probs = torch.softmax(logits, dim=-1)
            logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
        return logits

    def sample(self, logits: torch.Tensor, suppress: Sequence[int] = ()) -> int:
        """Picks the next token from [vocab] float32 logits; `suppress` ids
        (EOS before min_new_tokens) are never picked."""
        logits = self.penalize(logits.float())
        if suppress:
            logits = logits.index_fill(
                0, torch.as_tensor(list(suppress), device=logits.device), float("-inf")
            )
        if self.params.greedy:
            token = int(torch.argmax(logits))
        else:
            probs = torch.softmax(self.truncate(logits), dim=-1)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        self.counts[token] += 1
        self.seen[token] = True
        return token


def logprobs_of(logits: torch.Tensor, token: int, top: int) -> tuple[float, list[int], list[float]]:
    """Model log-probability of `token` and the `top` most likely alternatives."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    if top > 0:
        values, ids = torch.topk(lp, top)
        return float(lp[token]), ids.tolist(), values.tolist()
    return float(lp[token]), [], []
