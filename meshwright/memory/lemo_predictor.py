"""LeMo pattern predictors: cheap per-layer estimates of block informativeness.

Exact scores need every q_i . k_j (quadratic in the context). A predictor maps each token's layer
input x (after the block's attention_norm) to two non-negative low-rank features,
q~ = relu(x A), k~ = relu(x B) (rank r), and estimates I(T_j) ~ k~_j . sum_{i>j} q~_i. Because the
features are non-negative the relu of the true score needs no counterpart, and the causal sum over
later queries is a suffix sum: the whole estimate is linear in the sequence length.
Predictors are trained against the exact block scores with the base model frozen
(``train_predictors``), and judged by their recall of the true top blocks (``predictor_recall``).
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from meshwright.errors import invalid
from meshwright.memory.lemo import LemoMixin, aggregate_blocks, lemo_layers, select_blocks, topk_recall


class BlockScorePredictor(nn.Module):
    """Low-rank ReLU predictor of causal block informativeness for one layer."""

    def __init__(self, d_model: int, rank: int = 16) -> None:
        super().__init__()
        if rank < 1:
            raise invalid("lemo.predictor_rank", rank, "a positive integer")
        self.q = nn.Linear(d_model, rank)
        self.k = nn.Linear(d_model, rank)
        nn.init.normal_(self.q.weight, std=d_model ** -0.5)
        nn.init.normal_(self.k.weight, std=d_model ** -0.5)
        nn.init.constant_(self.q.bias, 0.1)
        nn.init.constant_(self.k.bias, 0.1)

    def token_scores(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, seq, d) -> (batch, seq) estimated informativeness of every token."""
        qt = torch.relu(self.q(x.float()))
        kt = torch.relu(self.k(x.float()))
        later = qt.sum(1, keepdim=True) - qt.cumsum(1)  # sum over i > j of q~_i
        return (later * kt).sum(-1)

    def forward(self, x: torch.Tensor, block_size: int, aggregate: str = "mean") -> torch.Tensor:
        """Estimated block scores (batch, seq/block_size), aggregated like the exact ones."""
        return aggregate_blocks(self.token_scores(x), block_size, aggregate)


def attach_predictors(model: nn.Module, rank: int = 16) -> dict[int, BlockScorePredictor]:
    """Give every LeMo layer a fresh predictor (``layers.<i>.lemo_predictor``); returns them by layer."""
    out = {}
    for i, block in lemo_layers(model).items():
        w = block.attention.wq.weight
        block.lemo_predictor = BlockScorePredictor(block.attention.wq.in_features, rank).to(w.device)
        out[i] = block.lemo_predictor
    if not out:
        raise invalid("lemo.layers", [], "at least one layer: call apply_lemo(model, cfg) first")
    return out


@contextlib.contextmanager
def _recording(model: nn.Module) -> Iterator[dict[int, list]]:
    """Make every LeMo layer record (layer input, exact block scores) and score exactly."""
    blocks = lemo_layers(model)
    saved = {i: (b.lemo.scorer, b.lemo.record) for i, b in blocks.items()}
    records: dict[int, list] = {}
    for i, b in blocks.items():
        records[i] = []
        b.lemo.record, b.lemo.scorer = records[i], "attention"
    try:
        yield records
    finally:
        for i, b in blocks.items():
            b.lemo.scorer, b.lemo.record = saved[i]


def distribution_loss(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """KL(true share of score mass over blocks || predicted share): cares about which blocks carry
    the mass (what selection needs), not about the scale of the scores."""
    t = true / true.sum(-1, keepdim=True).clamp_min(1e-12)
    logp = torch.log(pred.clamp_min(0) + 1e-6 * pred.detach().abs().mean(-1, keepdim=True).clamp_min(1e-12))
    logp = logp - torch.logsumexp(logp, dim=-1, keepdim=True)
    return (t * (torch.log(t.clamp_min(1e-12)) - logp)).sum(-1).mean()


def train_predictors(model: nn.Module, batches: Iterable[torch.Tensor], steps: int, lr: float = 3e-3,
                     rank: int = 16, progress: bool = True) -> list[float]:
    """Fit per-layer predictors to the exact block scores with the base model frozen.

    ``batches`` yields token tensors (batch, seq); each step runs the model forward without grad
    (LeMo layers score exactly and record their inputs) and takes one AdamW step on every
    predictor. Returns the loss per step (sum over layers).
    """
    if steps < 1:
        raise invalid("steps", steps, "a positive integer")
    preds = {i: b.lemo_predictor for i, b in lemo_layers(model).items() if b.lemo_predictor is not None}
    if not preds:
        preds = attach_predictors(model, rank)
    params = [p for m in preds.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    blocks = lemo_layers(model)
    was_training = model.training
    model.eval()
    losses = []
    it = iter(batches)
    bar = tqdm(range(steps), desc="lemo predictors", disable=not progress, leave=False)
    for _ in bar:
        tokens = next(it)
        with _recording(model) as rec, torch.no_grad():
            model(tokens)
        loss = sum(distribution_loss(preds[i](x, blocks[i].lemo.block_size, blocks[i].lemo.aggregate), true)
                   for i in preds for x, true in rec[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    model.train(was_training)
    return losses


@torch.no_grad()
def predictor_recall(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[int, float]:
    """Per LeMo layer: mean recall of the exact top blocks (at the layer's keep count) by its predictor."""
    blocks = lemo_layers(model)
    sums: dict[int, float] = {i: 0.0 for i, b in blocks.items() if b.lemo_predictor is not None}
    n = 0
    for tokens in batches:
        with _recording(model) as rec:
            model(tokens)
        n += 1
        for i in sums:
            b: LemoMixin = blocks[i]
            for x, true in rec[i]:
                k = select_blocks(true, b.lemo.keep_ratio, b.lemo.threshold).shape[-1]
                sums[i] += topk_recall(b.lemo_predictor(x, b.lemo.block_size, b.lemo.aggregate), true, k) / len(rec[i])
    return {i: v / max(n, 1) for i, v in sums.items()}


__all__ = ["BlockScorePredictor", "attach_predictors", "train_predictors", "predictor_recall", "distribution_loss"]
