"""The metric a run is judged by, and the objective its backward pass differentiates.

A run explains n target tokens t_0..t_{n-1} at its last n positions (a multi-token target is
teacher-forced: the model reads prompt + t_0..t_{n-2}). Its NLL is the sum of the target tokens' NLLs,
L = -sum_k log softmax(logits[P-1+k])[t_k]. The metric is the target's log-probability -L, or, with a
distractor d, the logit difference logit(t_0) - logit(d) at the last position. The backward pass
explains -metric (the NLL itself when there is no distractor), so every gradient view points toward the
target in both cases.
"""
from __future__ import annotations

import torch

from .vocab import nll, working


def target_nll(rows: torch.Tensor, target_ids) -> torch.Tensor:
    """sum_k -log softmax(rows[..., k, :])[t_k]: rows [..., n, V] -> [...] (differentiable)."""
    ids = torch.as_tensor(list(target_ids), dtype=torch.long, device=rows.device)
    return nll(rows, ids.expand(rows.shape[:-1])).sum(-1)


def metric(rows: torch.Tensor, target_ids, distractor_id: int | None = None) -> torch.Tensor:
    """The metric of runs whose explained positions hold `rows` [..., n, V]: the summed target
    log-probability, or logit(t_0) - logit(distractor) at the last row when a distractor is given."""
    if distractor_id is None:
        return -target_nll(rows, target_ids)
    last = working(rows[..., -1, :])
    return last[..., int(target_ids[0])] - last[..., int(distractor_id)]


def objective(rows: torch.Tensor, target_ids, distractor_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(what the backward pass differentiates, the NLL) for one run's rows [n, V]: (-metric, NLL)."""
    loss = target_nll(rows, target_ids)
    return (loss if distractor_id is None else -metric(rows, target_ids, distractor_id)), loss
