"""Group-relative advantage estimators for flat GRPO and tree-style (thought x answer) GRPO.

Pure, vectorized tensor functions: no config objects, no I/O, no Python loops over samples.

References
----------
* GRPO -- Shao et al., "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open
  Language Models", arXiv:2402.03300. Advantage = (r - mean(group)) / std(group).
* Dr. GRPO -- Liu et al., "Understanding R1-Zero-Like Training: A Critical Perspective",
  arXiv:2503.20783. Drops the std normalisation (``scale="none"``).
* RLOO -- Ahmadian et al., "Back to Basics: Revisiting REINFORCE Style Optimization for Learning
  from Human Feedback in LLMs", arXiv:2402.14740. Leave-one-out baseline (``baseline="rloo"``).
* GRPO-MA -- "GRPO-MA: Multi-Answer Generation in GRPO for Stable and Efficient
  Chain-of-Thought Training", arXiv:2509.24494. K thoughts per prompt, M answers per thought;
  a thought's value is the mean reward of its answers, and thoughts are compared group-relatively.

Departures from the references
------------------------------
* The std is torch's default *unbiased* std (``rewards.std(dim=-1)``), as in TRL and verl; the
  DeepSeekMath paper does not specify the estimator.
* With a centring baseline (``"mean"``/``"rloo"``) a group whose rewards are all equal gets
  advantages of exactly 0. Without this guard, floating-point error in the mean can leave
  residues like 1e-9 which ``/ (0 + eps)`` would inflate to 1e-3.
* A group of size 1 has an undefined std; we treat it as 0, so nothing here ever returns NaN.
"""
from __future__ import annotations

import torch
from torch import Tensor

from vlm_treegrpo.core._checks import check_choice

SCALES = ("std", "none")
BASELINES = ("mean", "rloo", "none")
ANSWER_SCOPES = ("group", "thought")


def _as_float(rewards: Tensor) -> Tensor:
    return rewards if rewards.is_floating_point() else rewards.to(torch.get_default_dtype())


def group_advantages(
    rewards: Tensor,
    scale: str = "std",
    baseline: str = "mean",
    eps: float = 1e-6,
) -> Tensor:
    """Group-relative advantages for ``rewards`` of shape ``[N, G]`` (N groups of G samples).

    GRPO (arXiv:2402.03300): ``A = (r - baseline) / (std + eps)``.

    Args:
        rewards: ``[N, G]`` rewards; non-float dtypes are cast to the default float dtype.
        scale: ``"std"`` divides by the group's unbiased std plus ``eps`` (GRPO, as in TRL/verl);
            ``"none"`` does not divide (Dr. GRPO, arXiv:2503.20783).
        baseline: ``"mean"`` subtracts the group mean (GRPO); ``"rloo"`` subtracts the mean of the
            other G-1 rewards (RLOO, arXiv:2402.14740; needs G >= 2); ``"none"`` subtracts
            nothing (plain REINFORCE).
        eps: added to the std before dividing.

    Returns:
        ``[N, G]`` advantages. With ``"mean"``/``"rloo"``, constant groups give exactly 0.
        For G == 1 the std is taken as 0 (never NaN).
    """
    check_choice("scale", scale, SCALES)
    check_choice("baseline", baseline, BASELINES)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [N, G], got shape {tuple(rewards.shape)}")
    rewards = _as_float(rewards)  # [N, G]
    g = rewards.shape[-1]

    if baseline == "mean":
        centered = rewards - rewards.mean(dim=-1, keepdim=True)  # [N, G]
    elif baseline == "rloo":
        if g < 2:
            raise ValueError(f"baseline='rloo' needs a group size G >= 2, got G={g}")
        total = rewards.sum(dim=-1, keepdim=True)  # [N, 1]
        centered = rewards - (total - rewards) / (g - 1)  # [N, G]
    else:
        centered = rewards  # [N, G]

    if baseline != "none":
        # Exact zeros for constant groups (see module docstring).
        constant = (rewards == rewards[..., :1]).all(dim=-1, keepdim=True)  # [N, 1]
        centered = torch.where(constant, torch.zeros_like(centered), centered)  # [N, G]

    if scale == "none":
        return centered
    if g < 2:
        std = torch.zeros_like(rewards)  # [N, G]; unbiased std undefined for G == 1 -> 0
    else:
        std = rewards.std(dim=-1, keepdim=True)  # [N, 1]
    return centered / (std + eps)  # [N, G]


def thought_values(rewards: Tensor) -> Tensor:
    """Value of each thought: the mean reward over its M continuations (GRPO-MA, arXiv:2509.24494).

    Args:
        rewards: ``[N, K, M]``.

    Returns:
        ``[N, K]``.
    """
    if rewards.dim() != 3:
        raise ValueError(f"rewards must be [N, K, M], got shape {tuple(rewards.shape)}")
    return _as_float(rewards).mean(dim=-1)  # [N, K]


def tree_advantages(
    rewards: Tensor,
    scale: str = "std",
    answer_scope: str = "group",
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Advantages for a two-level rollout tree: K thoughts per prompt, M answers per thought.

    Follows GRPO-MA (arXiv:2509.24494): the thought value ``V_k = mean_m R[k, m]`` and the thought
    advantage is the group-relative (mean-baseline) advantage of ``V`` over the K thoughts. The
    answer advantage is group-relative over either all K*M answers of the prompt
    (``answer_scope="group"``, as in GRPO-MA) or only the M siblings sharing a thought
    (``answer_scope="thought"``, our option: isolates answer quality given the thought; a
    thought whose answers all agree gets answer advantages of 0).

    With M == 1 the thought advantages equal flat ``group_advantages(rewards[:, :, 0])``.

    Args:
        rewards: ``[N, K, M]``.
        scale: ``"std"`` or ``"none"``, applied at both levels (see :func:`group_advantages`).
        answer_scope: ``"group"`` or ``"thought"``.
        eps: added to the std before dividing.

    Returns:
        ``(thought_adv [N, K], answer_adv [N, K, M])``.
    """
    check_choice("scale", scale, SCALES)
    check_choice("answer_scope", answer_scope, ANSWER_SCOPES)
    if rewards.dim() != 3:
        raise ValueError(f"rewards must be [N, K, M], got shape {tuple(rewards.shape)}")
    rewards = _as_float(rewards)  # [N, K, M]
    n, k, m = rewards.shape

    values = thought_values(rewards)  # [N, K]
    thought_adv = group_advantages(values, scale=scale, baseline="mean", eps=eps)  # [N, K]

    if answer_scope == "group":
        flat = rewards.reshape(n, k * m)  # [N, K*M]
    else:
        flat = rewards.reshape(n * k, m)  # [N*K, M]
    answer_adv = group_advantages(flat, scale=scale, baseline="mean", eps=eps)
    return thought_adv, answer_adv.reshape(n, k, m)  # [N, K], [N, K, M]
