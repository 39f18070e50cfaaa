"""RREDCoT credit assignment for text policies (arXiv 2606.06475): the model-facing half.

After a rollout, each leaf's completion (thought + continuation) is cut into segments, the value
``V(s_i)`` of every prefix ``s_i`` is estimated with the policy itself *without generating*, the
leaf's return is redistributed over its segments (``r_i = V(s_i) - V(s_{i-1})``) and the
segment returns become per-token advantages for the same policy loss. The arithmetic is the pure
:mod:`vlm_treegrpo.core.rredcot`; this file tokenizes, lays out and runs the forwards.

Our choices (the paper's text is not available to us; docs/algorithms.md section 4)
----------------------------------------------------------------------------------------
* Segmentation. A thought and each of its continuations are segmented separately, so the branch
  point is always a segment boundary and a thought's segments (hence their values) are shared
  by its M leaves. ``delimiters``: a segment ends after a token containing a line break or the
  single-token ``</think>``, and before a single-token ``Step`` / ``So`` / ``Therefore`` (with or
  without a leading space). ``entropy``: tokens above the row's entropy quantile start segments
  (entropies from one extra no-grad forward). ``hybrid``: both. ``min_len`` applies to each.
* Values without generating, all probes of a tree in ONE packed forward: the tree row is rebuilt
  with each thought and continuation split into its segments (a chain of tree-packing segments,
  :mod:`vlm_treegrpo.core.tree_packing`), and after every segment end whose value is needed a
  probe ``answer_prefix + candidate`` is attached as an extra child segment. Tree attention makes
  each probe see exactly its own prefix, so its log-prob equals a separate forward on
  ``prompt + prefix + probe`` (tested).
  - ``answer_prob``: one candidate, the gold answer; ``V = p(gold | prefix, answer_prefix)``
    (:func:`core.rredcot.answer_prob_values`, no length normalization).
  - ``importance``: the candidates are the group's extracted final answers (those of at most
    ``MAX_CANDIDATE_TOKENS`` tokens); leaf j's weight after prefix s is the softmax over the
    group's *other* leaves of the per-token mean log-likelihood of their answer after s, and
    ``V(s) = sum_j w_j R_j`` (:func:`core.rredcot.importance_values`, self-normalized with a
    uniform proposal). A group without any candidate gets ``V = 0`` (outcome credit).
* Redistribution. The reported segment rewards are return-equivalent (``include_baseline``:
  they sum to the leaf's return). The advantages use the reward-to-go with ``V(s_0)`` as the
  first segment's baseline, i.e. ``G_i = R - V(s_{i-1})`` for every segment, normalized over
  all segments of the prompt group (:func:`core.rredcot.segment_advantages`, ``algo.scale``).
* A thought token is packed once but belongs to M leaves: it trains with the mean of its M
  leaves' token advantages (the M leaves share the thought's segments, so this is the mean of
  ``R_km - V(s)`` over m: the Monte Carlo thought value minus the model's value, normalized).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from vlm_treegrpo.core import rredcot
from vlm_treegrpo.rewards.functions import extract_final_answer
from vlm_treegrpo.rollout.packing import PackedBatch
from vlm_treegrpo.rollout.segments import SegmentRow, pack_rows, packed_entropy, pieces
from vlm_treegrpo.rollout.tree import Tree
from vlm_treegrpo.rollout.scores import check_spans
from vlm_treegrpo.config import ConfigError
from vlm_treegrpo.policy.text import TextPolicy

SENTINEL = -2
"""Pseudo token id marking 'a segment ends after this token' for the pure segmenters."""
END_MARKERS = ("</think>", " </think>")
"""Single-token strings that end a segment (besides every token containing a line break)."""
START_MARKERS = ("Step", " Step", "So", " So", "Therefore", " Therefore")
"""Single-token strings that start a segment."""
MAX_CANDIDATE_TOKENS = 16
"""Longest extracted answer used as an importance-sampling candidate."""


def marker_ids(tokenizer) -> tuple[list[int], list[int]]:
    """``(end_ids, start_ids)``: vocabulary ids that end / start a segment (module docstring)."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    end = {i for i, t in enumerate(texts) if "\n" in t}
    single = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    end |= {ids[0] for s in END_MARKERS if len(ids := single(s)) == 1}
    start = {ids[0] for s in START_MARKERS if len(ids := single(s)) == 1}
    return sorted(end), sorted(start)


def _right_pad(seqs: list[list[int]], pad: int = 0) -> tuple[Tensor, Tensor]:
    """``(ids [B, L], mask [B, L] bool)``, right-padded (L >= 1)."""
    L = max([len(s) for s in seqs] + [1])
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = True
    return ids, mask


@dataclass
class CreditResult:
    """What :meth:`RRedCoT.assign` computed, per leaf (B = N*K*M leaves in (n, k, m) order)."""

    leaf_ids: Tensor  # [B, Lc] completion tokens (thought + continuation), 0-padded
    seg_id: Tensor  # [B, Lc] segment of each token, -1 on padding
    valid: Tensor  # [B, S] bool, left-aligned
    values: Tensor  # [B, S+1] V(s_0), V after segment i (NaN where not estimated: after the last)
    seg_rewards: Tensor  # [B, S] return-equivalent redistributed rewards (sum = return)
    seg_adv: Tensor  # [B, S] group-relative segment advantages
    token_adv: Tensor  # [B, Lc] per-token advantages of each leaf
    advantages: Tensor  # [N, L] per-token advantages in the policy's packed training batch
    metrics: dict


class RRedCoT:
    """Per-segment credit for a text policy's tree rollouts. Build once per run (scans the vocabulary)."""

    def __init__(self, tokenizer, segmenter: str = "delimiters", values: str = "answer_prob", min_len: int = 2,
                 quantile: float = 0.9, answer_prefix: str = "\nAnswer:", scale: str = "std", eps: float = 1e-6,
                 temperature: float = 1.0):
        self.tokenizer, self.segmenter, self.value_kind = tokenizer, segmenter, values
        self.min_len, self.quantile, self.answer_prefix = min_len, quantile, answer_prefix
        self.scale, self.eps, self.temperature = scale, eps, temperature
        self.end_ids, self.start_ids = marker_ids(tokenizer)
        self.prefix_ids = tokenizer(answer_prefix, add_special_tokens=False)["input_ids"]

    # ------------------------------------------------------------------ tokens

    def answer_tokens(self, answer: str) -> list[int]:
        """Scored tokens of ``answer`` after ``answer_prefix`` (as they tokenize together when possible)."""
        full = self.tokenizer(self.answer_prefix + " " + answer.strip(), add_special_tokens=False)["input_ids"]
        if full[: len(self.prefix_ids)] == self.prefix_ids and len(full) > len(self.prefix_ids):
            return full[len(self.prefix_ids) :]
        return self.tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]

    def _segment(self, seqs: list[list[int]], entropy: Tensor | None) -> Tensor:
        """Segment ids ``[B, L]`` (-1 on padding) of right-padded token lists."""
        ids, mask = _right_pad(seqs)
        ends = torch.isin(ids, torch.tensor(self.end_ids, dtype=torch.long))  # [B, L]
        starts_next = torch.zeros_like(ends)
        starts_next[:, :-1] = torch.isin(ids[:, 1:], torch.tensor(self.start_ids, dtype=torch.long)) & mask[:, 1:]
        pseudo = torch.where(ends | starts_next, torch.full_like(ids, SENTINEL), ids)  # [B, L]
        bnd = torch.tensor([SENTINEL])
        if self.segmenter == "delimiters":
            return rredcot.segment_by_delimiters(pseudo, mask, bnd, self.min_len)
        ent = entropy[:, : ids.shape[1]]
        if self.segmenter == "entropy":
            return rredcot.segment_by_entropy(ent, mask, self.quantile, self.min_len)
        return rredcot.segment_hybrid(pseudo, ent, mask, bnd, self.quantile, self.min_len)

    def _entropies(self, policy, trees: list[Tree]) -> tuple[Tensor, Tensor]:
        """Per-token entropies of every thought ``[N*K, Lt]`` and continuation ``[N*K*M, La]``."""
        rows, th_spans, ans_spans = [], [], []
        for tree in trees:
            row = SegmentRow()
            row.add(list(tree.prompt_ids), -1)
            for k, th in enumerate(tree.thoughts):
                s, a = row.add(list(th), 0, [1.0] * len(th))
                th_spans.append((len(rows), a, len(th)))
                for ans in tree.answers[k]:
                    if ans:
                        _, b = row.add(list(ans), s, [1.0] * len(ans))
                        ans_spans.append((len(rows), b, len(ans)))
                    else:
                        ans_spans.append((len(rows), 0, 0))
            rows.append(row)
        ent = packed_entropy(policy.model, pack_rows(rows, self.tokenizer.pad_token_id), self.temperature)  # [N, L]
        th = torch.zeros(len(th_spans), max(n for _, _, n in th_spans) or 1)
        an = torch.zeros(len(ans_spans), max([n for _, _, n in ans_spans] + [1]))
        for i, (r, a, n) in enumerate(th_spans):
            th[i, :n] = ent[r, a : a + n]
        for i, (r, a, n) in enumerate(ans_spans):
            an[i, :n] = ent[r, a : a + n]
        return th, an

    # ------------------------------------------------------------------ values

    def _candidates(self, tree_idx: int, example, texts: list[str], G: int) -> tuple[list[list[int]], list[int]]:
        """Candidate answer token lists of a tree and each leaf's candidate index (-1 = none)."""
        if self.value_kind == "answer_prob":
            return [self.answer_tokens(str(example.answer))], [0] * G
        cands: list[list[int]] = []
        index: dict[tuple, int] = {}
        of_leaf = []
        for j in range(G):
            ans = extract_final_answer(texts[tree_idx * G + j])
            toks = self.answer_tokens(ans) if ans else []
            if not toks or len(toks) > MAX_CANDIDATE_TOKENS:
                of_leaf.append(-1)
                continue
            key = tuple(toks)
            if key not in index:
                index[key] = len(cands)
                cands.append(toks)
            of_leaf.append(index[key])
        return cands, of_leaf

    def _probe_forward(self, policy, trees, th_seg, an_seg, needed, cands) -> tuple[dict, int]:
        """Build the probe rows and run one forward per tree.

        Returns ``({node: [C] summed log-prob of each candidate after the node's prefix}, packed tokens)``.
        """
        rows, probe_of_token = [], []  # per row: list of (offset, node, cand) for scored tokens
        K, M = len(trees[0].thoughts), len(trees[0].answers[0])
        for n, tree in enumerate(trees):
            row, scored = SegmentRow(), []

            def probes(node, parent):
                if node not in needed:
                    return
                for c, toks in enumerate(cands[n]):
                    _, a = row.add(self.prefix_ids + toks, parent, [0.0] * len(self.prefix_ids) + [1.0] * len(toks))
                    scored.extend((a + len(self.prefix_ids) + t, node, c) for t in range(len(toks)))

            row.add(list(tree.prompt_ids), -1)
            probes(("root", n), 0)
            for k, th in enumerate(tree.thoughts):
                parent = 0
                for j, (a, b) in enumerate(pieces(th_seg[n * K + k])):
                    parent, _ = row.add(list(th[a:b]), parent)
                    probes(("th", n, k, j), parent)
                th_last = parent
                for m, ans in enumerate(tree.answers[k]):
                    parent = th_last
                    for j, (a, b) in enumerate(pieces(an_seg[(n * K + k) * M + m])):
                        parent, _ = row.add(list(ans[a:b]), parent)
                        probes(("ans", n, k, m, j), parent)
            rows.append(row)
            probe_of_token.append(scored)
        batch = pack_rows(rows, self.tokenizer.pad_token_id)
        dev = next(policy.model.parameters()).device
        sums: dict = {}
        with torch.no_grad():
            for n in range(len(rows)):  # one forward per tree row
                if not probe_of_token[n]:
                    continue
                logp = policy.logp(batch.rows(slice(n, n + 1)).to(dev), self.temperature)[0].double().cpu()  # [L]
                nodes = sorted({node for _, node, _ in probe_of_token[n]}, key=str)
                slot = {node: i for i, node in enumerate(nodes)}
                C = len(cands[n])
                off = torch.tensor([o for o, _, _ in probe_of_token[n]])
                key = torch.tensor([slot[node] * C + c for _, node, c in probe_of_token[n]])
                flat = torch.zeros(len(nodes) * C, dtype=torch.float64).index_add_(0, key, logp[off])  # [nodes*C]
                sums.update({node: flat[i * C : (i + 1) * C] for i, node in enumerate(nodes)})
        return sums, int(sum(len(r.toks) for r in rows))

    # ------------------------------------------------------------------ main

    def _leaves(self, trees: list[Tree], th_seg: Tensor, an_seg: Tensor) -> tuple[Tensor, Tensor, list[list[tuple]]]:
        """Leaf completions ``[B, Lc]``, their segment ids ``[B, Lc]`` (thought segments first, then the
        continuation's, renumbered), and per leaf the nodes closing ``s_0, s_1, ...`` (root, then each segment end)."""
        K, M = len(trees[0].thoughts), len(trees[0].answers[0])
        n_th = (th_seg.max(dim=1).values + 1).clamp_min(0).tolist()  # [N*K] segments per thought
        seqs, segs, leaf_nodes = [], [], []
        for n, tree in enumerate(trees):
            for k, th in enumerate(tree.thoughts):
                tk = n * K + k
                for m, ans in enumerate(tree.answers[k]):
                    ans_seg = an_seg[tk * M + m, : len(ans)]
                    seqs.append(list(th) + list(ans))
                    segs.append(th_seg[tk, : len(th)].tolist() + (ans_seg + n_th[tk]).tolist())
                    n_ans = int(ans_seg.max()) + 1 if ans else 0
                    leaf_nodes.append([("root", n)] + [("th", n, k, j) for j in range(n_th[tk])]
                                      + [("ans", n, k, m, j) for j in range(n_ans)])
        leaf_ids, _ = _right_pad(seqs)
        seg_id = torch.full(leaf_ids.shape, -1, dtype=torch.long)
        for b, sg in enumerate(segs):
            seg_id[b, : len(sg)] = torch.tensor(sg, dtype=torch.long)
        return leaf_ids, seg_id, leaf_nodes

    def _values(self, sums: dict, leaf_nodes: list[list[tuple]], n_seg: Tensor, cands, cand_of_leaf,
                rewards: Tensor) -> Tensor:
        """``V [B, S+1]`` per leaf from the probes' log-prob sums (NaN after a leaf's last segment)."""
        N, K, M = rewards.shape
        G, B, S = K * M, len(leaf_nodes), int(n_seg.max())
        nodes = sorted({nd for b, ls in enumerate(leaf_nodes) for nd in ls[: int(n_seg[b])]}, key=str)
        pos = {node: i for i, node in enumerate(nodes)}
        C = max([len(c) for c in cands] + [1])
        table = torch.full((len(nodes) + 1, C), float("-inf"), dtype=torch.float64)  # [nodes+1, C]; last row unused
        for node, vec in sums.items():  # a node without probes (no candidates) keeps -inf: V = 0
            table[pos[node], : vec.numel()] = vec
        node_idx = torch.full((B, S + 1), len(nodes), dtype=torch.long)  # [B, S+1]
        for b, ls in enumerate(leaf_nodes):
            node_idx[b, : int(n_seg[b])] = torch.tensor([pos[nd] for nd in ls[: int(n_seg[b])]], dtype=torch.long)
        have = node_idx < len(nodes)  # [B, S+1]
        if self.value_kind == "answer_prob":
            logp_sums = table[node_idx, 0]  # [B, S+1]
            values = rredcot.answer_prob_values(torch.where(have, logp_sums, torch.zeros_like(logp_sums)))
        else:
            cand_len = torch.ones(N, C, dtype=torch.float64)  # [N, C]
            for n, cs in enumerate(cands):
                cand_len[n, : len(cs)] = torch.tensor([len(t) for t in cs], dtype=torch.float64)
            tree_of = torch.arange(B) // G  # [B]
            of = torch.tensor([cand_of_leaf[n] for n in range(N)]).repeat_interleave(G, dim=0)  # [B, J] candidate of leaf j
            per_tok = table[node_idx] / cand_len[tree_of].unsqueeze(1)  # [B, S+1, C] mean log-lik per token
            cont_logp = per_tok.gather(2, of.clamp_min(0).unsqueeze(1).expand(B, S + 1, G))  # [B, S+1, J]
            own = torch.arange(G).unsqueeze(0) == (torch.arange(B) % G).unsqueeze(1)  # [B, J]
            mask = ((of >= 0) & ~own).unsqueeze(1) & have.unsqueeze(2)  # [B, S+1, J]
            cont_logp = torch.where(mask, cont_logp, torch.zeros_like(cont_logp))
            group_rewards = rewards.reshape(N, G).double()[tree_of]  # [B, J]
            values = rredcot.importance_values(cont_logp, group_rewards, cont_mask=mask)
        return torch.where(have, values, torch.full_like(values, float("nan")))  # [B, S+1]

    @staticmethod
    def _place(token_adv: Tensor, trees: list[Tree], packed: PackedBatch) -> Tensor:
        """Leaf token advantages ``[B, Lc]`` -> the packed batch's ``[N, L]`` (thought tokens: mean over M)."""
        N, K, M = len(trees), len(trees[0].thoughts), len(trees[0].answers[0])
        per = token_adv.view(N, K, M, -1)  # [N, K, M, Lc]
        thought_mean = per.mean(dim=2)  # [N, K, Lc]: the M leaves share their thought's tokens
        adv = torch.zeros(packed.advantages.shape)  # [N, L]
        for n, tree in enumerate(trees):
            th_spans, ans_spans = check_spans(tree, packed.input_ids[n].cpu())
            for k, (a, b) in enumerate(th_spans):
                adv[n, a:b] = thought_mean[n, k, : b - a]
                for m, span in enumerate(ans_spans[k]):
                    if span is not None:
                        adv[n, span[0] : span[1]] = per[n, k, m, b - a : b - a + span[1] - span[0]]
        adv = adv.to(packed.advantages.device)
        return torch.where(packed.target_mask > 0, adv, torch.zeros_like(adv))

    def assign(self, policy, trees: list[Tree], examples: list, rewards: Tensor, packed: PackedBatch,
               texts: list[str]) -> CreditResult:
        """Per-token RREDCoT advantages for the policy's packed batch ``packed`` (module docstring).

        ``rewards [N, K, M]`` are the leaves' returns, ``texts`` their decoded completions in
        (n, k, m) order (for the importance estimator's candidates).
        """
        t0 = time.time()
        N, K, M = rewards.shape
        G = K * M
        th_list = [list(t.thoughts[k]) for t in trees for k in range(K)]
        an_list = [list(t.answers[k][m]) for t in trees for k in range(K) for m in range(M)]
        th_ent = an_ent = None
        if self.segmenter != "delimiters":
            th_ent, an_ent = self._entropies(policy, trees)
        th_seg = self._segment(th_list, th_ent)  # [N*K, Lt]
        an_seg = self._segment(an_list, an_ent)  # [N*K*M, La]
        leaf_ids, seg_id, leaf_nodes = self._leaves(trees, th_seg, an_seg)  # [B, Lc], [B, Lc]
        _, valid = rredcot.segment_ends(seg_id)  # [B, S]
        n_seg = valid.sum(1)  # [B]
        # Values are needed at the root and after every segment but a leaf's last.
        needed = {nodes[i] for b, nodes in enumerate(leaf_nodes) for i in range(int(n_seg[b]))}
        cands, cand_of_leaf = zip(*[self._candidates(n, ex, texts, G) for n, ex in enumerate(examples)])
        sums, probe_tokens = self._probe_forward(policy, trees, th_seg, an_seg, needed, cands)  # {node: [C]}
        values = self._values(sums, leaf_nodes, n_seg, cands, cand_of_leaf, rewards)  # [B, S+1]

        returns = rewards.reshape(-1).double()  # [B]
        seg_rewards = rredcot.redistribute(values, valid, returns, include_baseline=True)  # [B, S] sums to R
        adv_rewards = rredcot.redistribute(values, valid, returns, include_baseline=False)  # [B, S] sums to R - V(s_0)
        group = torch.arange(returns.numel()) // G  # [B]
        seg_adv = rredcot.segment_advantages(adv_rewards, valid, group, scale=self.scale, eps=self.eps)  # [B, S]
        token_adv = rredcot.token_advantages_from_segments(seg_adv, seg_id).float()  # [B, Lc]
        advantages = self._place(token_adv, trees, packed)  # [N, L]

        metrics = {
            "rredcot/segments_per_leaf": float(n_seg.float().mean()),
            "rredcot/v0": float(values[:, 0].nanmean()),
            "rredcot/probe_tokens": probe_tokens,
            "rredcot/time": time.time() - t0,
        }
        if M > 1:  # the model's value at the branch point against the tree's Monte Carlo thought value
            n_th = (th_seg.max(dim=1).values + 1).clamp_min(0)  # [N*K]
            done = torch.tensor([t.thought_done[k] for t in trees for k in range(K)])  # [N*K]
            at_branch = values[torch.arange(N * K) * M, n_th]  # [N*K] V after the thought's last segment
            mc = rewards.reshape(N * K, M).double().mean(-1)  # [N*K]
            corr = rredcot.correlation(at_branch, mc, ~done & (n_th > 0) & ~torch.isnan(at_branch))
            if not torch.isnan(corr):
                metrics["rredcot/value_mc_corr"] = float(corr)
        return CreditResult(leaf_ids, seg_id, valid, values, seg_rewards, seg_adv, token_adv, advantages, metrics)

    def __call__(self, policy, trees, examples, rewards, packed, texts) -> tuple[PackedBatch, dict]:
        """The policy's packed batch with RREDCoT advantages, and metrics."""
        res = self.assign(policy, trees, examples, rewards, packed, texts)
        new = PackedBatch(**{k: getattr(packed, k) for k in packed.__dataclass_fields__})
        new.advantages = res.advantages
        return new, res.metrics


def rredcot_for(policy, algo, temperature: float) -> RRedCoT:
    """The config boundary: an :class:`RRedCoT` for a text policy and an ``AlgoConfig``."""
    if not isinstance(policy, TextPolicy):
        raise ConfigError(f"algo.credit: rredcot is implemented for text policies, not {type(policy).__name__}")
    return RRedCoT(policy.tokenizer, algo.rredcot_segmenter, algo.rredcot_values, algo.rredcot_min_len,
                   algo.rredcot_entropy_quantile, algo.rredcot_answer_prefix, algo.scale, algo.eps, temperature)
