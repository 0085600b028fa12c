"""The router: RIDE's dynamic expert assignment module (paper section 3.3).

Experts run one after another. After expert ``i`` has run, routing decision ``i`` looks at that expert's
pooled features and at the running mean of the logits of experts ``0..i``, and predicts whether the sample
needs expert ``i + 1``. Confident samples stop early, ambiguous ones (mostly tail classes) go on, so the
average cost per image falls below that of running every expert.

Each decision has its own hidden layer; the output layer is shared by all decisions, as in the official
code (``share_expert_help_pred_fc=True``)::

    h_i = ReLU(W_i · normalize(mean_hw(F_i)) + b_i)                     # [B, hidden_dim]
    z_i = w · concat(topk(mean_{j<=i} logits_j, k), h_i) + b            # [B], the router logit

The sample continues when ``sigmoid(z_i) > threshold`` (0.5 by default). Training (stage 2) fits ``z_i`` to
the help targets of the paper's equation 5 with a weighted binary cross-entropy (``ride_models.losses``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ExpertRouter"]


class ExpertRouter(nn.Module):
    """Expert assignment module with ``num_experts - 1`` routing decisions.

    Args:
        num_experts: Number of experts E of the model; the router makes E - 1 decisions.
        feature_dim: Width D of one expert's pooled features.
        top_k: Number K of the largest mean logits fed to each decision (capped by the caller at the
            number of classes).
        hidden_dim: Width of each decision's hidden layer (16 in the paper and the official code).

    The buffer ``trained`` (part of the state dict) records whether the router has been fitted, so that
    loading a stage-2 checkpoint switches routed inference on.
    """

    def __init__(self, num_experts: int, feature_dim: int, top_k: int, hidden_dim: int = 16) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be at least 1, got {num_experts}")
        if top_k < 1:
            raise ValueError(f"router top_k must be at least 1, got {top_k}")
        self.num_decisions = num_experts - 1
        self.feature_dim = feature_dim
        self.top_k = top_k
        self.hidden_dim = hidden_dim
        self.hidden = nn.ModuleList([nn.Linear(feature_dim, hidden_dim) for _ in range(num_experts - 1)])
        # Input order [top-k mean logits, hidden units] as in the official layout, so weights load unpermuted.
        self.fc = nn.Linear(top_k + hidden_dim, 1)
        self.register_buffer("trained", torch.zeros((), dtype=torch.bool))
        # Python mirror of the buffer: routing-mode checks must not read a tensor (a host sync, and it would
        # break FX tracing and TorchScript of the all-experts path). Refreshed by set_trained, loading a
        # state dict, and train() / eval().
        self.is_trained = False

    def set_trained(self, trained: bool = True) -> None:
        """Mark the router as fitted (or not); stored in the state dict."""
        self.trained.fill_(bool(trained))
        self.is_trained = bool(trained)

    def train(self, mode: bool = True) -> ExpertRouter:
        # train() / eval() re-read the buffer: copies into it in place (timm's ModelEma updates, SWA's
        # AveragedModel, ``trained.fill_``) do not pass through set_trained. One host read per mode switch.
        if not self.trained.is_meta:
            self.is_trained = bool(self.trained)
        return super().train(mode)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        flag = state_dict.get(prefix + "trained")
        if flag is not None:
            self.is_trained = bool(flag)

    def decision(self, index: int, features: torch.Tensor, mean_logits: torch.Tensor) -> torch.Tensor:
        """Router logit of decision ``index`` (does expert ``index + 1`` help?).

        Args:
            index: Decision number i, 0 <= i < E - 1.
            features: Pooled features of expert i, ``[B, D]``.
            mean_logits: Mean logits of experts 0..i, ``[B, C]``.

        Returns:
            The router logits ``z_i``, ``[B]``.
        """
        if not 0 <= index < self.num_decisions:
            raise IndexError(f"routing decision {index} out of range: this router has {self.num_decisions}")
        # The official code divides by the L2 norm without an epsilon (a zero feature gives NaN);
        # F.normalize's eps of 1e-12 only differs from it in that case.
        hidden = F.relu(self.hidden[index](F.normalize(features, dim=1)))
        top = torch.topk(mean_logits, self.top_k, dim=1, largest=True, sorted=True).values
        return self.fc(torch.cat([top, hidden], dim=1)).squeeze(1)

    def extra_repr(self) -> str:
        return f"decisions={self.num_decisions}, top_k={self.top_k}, trained={self.is_trained}"
