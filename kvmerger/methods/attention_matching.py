"""Attention matching: keep the most attended keys, then fit a logit bias and a value per kept slot.

Paper: Adam Zweiger, Xinghong Fu, Han Guo, Yoon Kim, "Fast KV Compaction via Attention Matching",
arXiv 2602.16284 (2026); reference code github.com/adamzweiger/compaction (read, not copied). This
is its AM-HighestAttnKeys variant (configuration "AM-HighestAttnKeys-basic" of the reference code's
default algorithm config), per layer and KV head:

1. Reference queries ``q_j`` (already multiplied by the attention scaling).
2. Keys: the ``S = layer.slots`` keys with the highest RMS, over the reference queries, of their
   softmax attention probability (the paper's "highest attention keys" with its RMS score).
3. Biases (attention mass): with per-query shift ``m_j = max_t q_j.k_t``, target mass
   ``y_j = sum_t exp(q_j.k_t - m_j)`` and design ``M_js = exp(q_j.k_s - m_j)`` over the kept keys,
   solve ``min_{w >= 0} ||M w - y||^2`` as the reference code does: the least-squares solution, clamped
   to the box ``[e^-3, e^3]``, then 2 projected-gradient steps (the reference code's step is
   ``1 / ||M||_2^2`` by power iteration; here ``1 / (||M||_1 ||M||_inf)``, an upper bound of it read in
   one pass, so every step is a descent step). Bias ``b_s = log w_s``, so
   ``sum_s exp(q.k_s + b_s) = sum_s w_s exp(q.k_s)``.
4. Values (attention output): with ``X_j = softmax_s(q_j.k_s + b_s)`` and the full-cache outputs
   ``Y_j = softmax_t(q_j.k_t) V``, least squares ``min ||X C - Y||^2`` (the paper's rule; its code's
   default configurations set no ridge). ``ridge=0`` (default) keeps it; ``ridge=0.1`` is our guard
   for repetitive text, see below.

Choices where the paper and its code do not apply to this engine (each one a parameter):

* Reference queries: the paper's best sources (self-study, repeat-prefill) need extra generation or a
  second prefill of the whole prompt; here the prompt's own query states are used, the paper's
  "context-prefill" source (its third, "slightly worse than repeat-prefill"). Of
  ``reference_queries`` prompt positions the last ``recent_queries`` (at most all) are taken and the others
  drawn uniformly without replacement (``seed``); every position gives one query per query head,
  pooled per KV head (as the reference code does for grouped-query attention). Default: the last 256
  positions. Like repeat-prefill's queries, which come after the whole context, they have seen all
  of it; queries drawn over the whole prompt, scored against keys they never saw, did much worse on
  tuning windows (mean KL 0.0140 / 0.0183 / 0.1055 at budgets 0.5 / 0.35 / 0.1 with 512 drawn
  positions; all 2048 positions: 0.0134 at 0.5 and 0.53 at 0.1; the last 256: 0.0042 / 0.0435 /
  0.1108, the instability at the smaller budgets coming from the unregularised value fit).
  (Tuning windows: ``essays()`` from character offsets 300000-600000, 2048 tokens, KL over the next
  128; never the evaluation windows.)
* ``causal=False`` (default, as the reference code treats context-prefill queries): each reference
  query is scored against every prompt key, also the keys after its own position, which it never
  attended to (with the default last queries, only a few keys). ``causal=True`` restricts both sides
  of every equation to the keys the query saw (tokens ``t <= p``, kept slots at ``<= p``); with
  uniformly drawn queries it was worse still (KL 0.149 at budget 0.5 on a tuning window): the RMS of
  softmax probabilities over a few visible keys favours the earliest tokens.
* Not on-policy: the reference code's "AM-HighestAttnKeys" extracts each layer's queries with the
  earlier layers already compacted; here every layer's queries come from the one full-cache prefill
  (its "-basic" configuration), as the engine compresses layer by layer during that prefill.
* Underdetermined fits. The reference code has far more reference queries than kept keys and solves
  plain least squares. With fewer rows than slots (a sample of queries, or a long prompt at a large
  budget) plain least squares returns the minimum-norm solution, which pulls unconstrained values
  toward zero. Here both fits are written as a correction of a prior, ``w = 1 + dw`` and
  ``C = V_kept + dC``, with the minimum-norm (ridge) correction: when there are at least as many rows
  as slots and the ridge is ~0 this is the reference code's solution; otherwise unconstrained slots
  keep their own token's weight and value. If the clamped closed form is worse on the bias
  objective than the prior itself, the projected steps start from the prior.
* Ridge: ``ridge`` (values) and ``bias_ridge`` (weights) are relative to the mean eigenvalue of the
  normal matrix (the reference code's "frobenius" scaling, ``lambda * ||X||_F^2 / S``), with a floor of
  ``1e-6`` (the reference code's fallback ridge) so that every system is positive definite in float32.
* The value ridge, and repetitive text (issue 18). The paper fits the values by plain least squares;
  its code has a ridge knob (``c2_ridge_lambda``) that none of its algorithm configurations sets, so
  the faithful fit, ``ridge=0`` (with the floor), stays the default, and is what every earlier
  attention-matching number in README.md and docs/BENCHMARKS.md measured. ``ridge=0.1`` is a guard of
  ours, the variant to use on real text. The cause: on repetitive text the unregularised value fit
  blows up. Many kept keys are near copies of each other (the same tokens, RoPE aside), so the columns
  of ``X`` are nearly collinear: on a repeated passage (lm-stress tuning window, seed 1) the normal
  matrices of the value fit have eigenvalues from ~1e2 down to ~1e-9 (below float32's resolution of
  the largest) against a floor ridge of ~1e-8 - 1e-7, the fitted values reproduce the reference
  outputs to 0-2% while reaching 20 times (budget 0.5) and 290 times (budget 0.1) the largest |value|
  of the prompt, and queries after the prompt, which those cancellations were not fitted for, read
  them: mean KL 0.39 against H2O's 0.0099 at budget 0.5, single tokens at 12.7 nats. The fit has only
  the context-prefill queries of the last 256 positions (768 rows per KV head; fewer rows than slots
  at budget 0.5 of 2k tokens), where the reference code's self-study supplies thousands; a ridge
  toward the kept tokens' own values is the regularisation that regime needs (a nearly singular solve,
  not the bias fit or float32 range: the values are solved in units of the row's largest |value|). The
  value 0.1 was chosen on the lm-stress tuning windows (seed 1: repeated passage, lists, RULER noise)
  and two lm windows (seed 1), never on reported windows: mean KL at budgets 0.5 / 0.1 on the repeated
  passage 0.39 / 2.77 (ridge 0), 0.080 / 2.29 (1e-3), 0.0027 / 2.25 (0.01), 0.0009 / 2.31 (0.1), H2O
  0.0099 / 1.14; lists 0.021 / 0.193, 0.021 / 0.087, 0.021 / 0.086, 0.023 / 0.090, H2O 0.016 / 0.106;
  an essay window at 0.5 / 0.35 / 0.1, 0.0010 / 0.0115 / 0.0142 (0), 0.0011 / 0.0015 / 0.0146 (0.01),
  0.0011 / 0.0015 / 0.0156 (0.1). 0.1 is also fitted-kvmerger's. What is left at budget 0.1 on the
  repeated passage is the choice of keys (keeping the top-RMS keys and fitting nothing: 2.65), not the
  fit. On RULER's noise the biases and values are not the cause either: at budget 0.5 keeping the keys
  alone gives mean KL 0.074 (worst token 3.8), the fits 0.062 - 0.064 with any ridge, H2O 0.0089.
* Numerics: float32 throughout, log-sum-exp shifts per query, values solved in units of the row's
  largest |value| and cast back to the cache dtype clamped to its finite range; biases stay finite
  (the box floor ``e^-3`` keeps every slot alive). Batched over heads, no loop over heads or tokens.

The fitting functions below are shared with kvmerger.methods.fitted_kvmerger.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvmerger.engine import kernels
from kvmerger.engine.scoring import LayerScores
from kvmerger.methods.base import CompressionMethod, LayerInput, LayerOutput, finite_as, row_scale, top_indices

RIDGE_FLOOR = 1e-6  # relative to the mean eigenvalue; the reference code's fallback ridge
QUERY_CHUNK = 512  # reference-query rows per chunk when computing full-cache targets
REFERENCES = ("prompt", "reconstruction")  # where reference queries come from


# --------------------------------------------------------------------------------------------
# Reference queries and the full cache's targets
# --------------------------------------------------------------------------------------------


@dataclass
class ReferenceQueries:
    """Reference queries for rows of a layer (one row per batch element and KV head)."""

    queries: torch.Tensor  # [N, R, d] float32, multiplied by the attention scaling
    positions: torch.Tensor  # [R] long: prompt position of each query (same in every row)


def sample_positions(length: int, count: int | None, recent: int, seed: int) -> torch.Tensor:
    """Sorted prompt positions: the last `min(recent, count)` (at least one), plus uniform draws among
    the others up to `count` in all (None or `count >= length`: every position)."""
    if count is None or count >= length:
        return torch.arange(length)
    recent = max(1, min(recent, count))
    others = length - recent
    generator = torch.Generator().manual_seed(seed)
    drawn = torch.randperm(others, generator=generator)[: count - recent]
    return torch.cat([drawn.sort().values, torch.arange(others, length)])


def reference_queries(
    scores: LayerScores, count: int | None, recent: int, seed: int, source: str = "prompt"
) -> ReferenceQueries:
    """Reference queries grouped by the KV head they attend with.

    `source="prompt"`: the prompt's own query states at `sample_positions`. `"reconstruction"`: the
    query states of KVzip's repeat pass (`LayerScores.reconstruction_queries`, the attention-matching
    paper's "repeat-prefill" queries), `count` of them evenly spaced (None: all); each saw the whole
    prompt, so it stands at the last prompt position for the causal restriction.
    """
    if scores.query is None:
        raise ValueError("attention fitting needs the layer's query states; these scores were given precomputed")
    batch, q_heads, length, dim = scores.query.shape
    kv_heads = scores.key.shape[1]
    if source == "reconstruction":
        states = scores.reconstruction_queries()
        available = states.shape[2]
        if count is not None and count < available:
            states = states[:, :, torch.linspace(0, available - 1, count).round().long().to(states.device)]
        positions = torch.full((states.shape[2],), length - 1, dtype=torch.long, device=states.device)
    else:
        positions = sample_positions(length, count, recent, seed).to(scores.query.device)
        states = scores.query[:, :, positions]
    picked = states.float() * scores.scaling  # [B, Hq, n, d]
    queries = picked.reshape(batch * kv_heads, (q_heads // kv_heads) * positions.numel(), dim)
    return ReferenceQueries(queries, positions.repeat(q_heads // kv_heads))


def check_reference(source: str) -> None:
    if source not in REFERENCES:
        raise ValueError(f"reference must be one of {', '.join(REFERENCES)}, got {source!r}")


@dataclass
class Targets:
    """What the full cache gives each reference query (only over the keys it may see)."""

    shift: torch.Tensor  # [N, R]: a per-query logit shift (the max, or the log-normaliser), subtracted on both sides
    mass: torch.Tensor  # [N, R]: sum_t exp(logit_t - shift)
    outputs: torch.Tensor  # [N, R, dv]: attention outputs, in units of the row's value scale
    attention_rms: torch.Tensor | None  # [N, T]: RMS over queries of each key's attention probability
    visible: torch.Tensor  # [N, R] bool: the query sees at least one token


def visibility(visible_from: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor | None:
    """[N, R, K] bool: query r (at `positions[r]`) sees item k when `visible_from[n, k] <= positions[r]`."""
    if visible_from is None:
        return None
    return visible_from.unsqueeze(1) <= positions.view(1, -1, 1)


def full_cache_targets(
    ref: ReferenceQueries,
    keys: torch.Tensor,
    values: torch.Tensor,
    token_from: torch.Tensor | None,
    chunk: int = QUERY_CHUNK,
    *,
    with_rms: bool = True,
) -> Targets:
    """Mass, outputs and per-key RMS attention of the full cache, in chunks of reference queries.

    keys [N, T, d], values [N, T, dv] (values already divided by their row scale); `token_from`
    [N, T] is the first query position that may see each token (None: every query sees every token).
    Without the RMS (`with_rms=False`, what the fitted merge needs) and where torch's fused CPU
    kernel runs (`kernels.available`, dv = d), one flash pass gives the outputs and each query's
    log-normaliser, which is then the shift (so the mass is 1): the same equations, as the fits
    divide each query's equation by its mass or normalise its row.
    """
    if not with_rms and keys.shape[-1] == values.shape[-1] and kernels.available(keys.device, torch.float32):
        return _fused_targets(ref, keys, values, token_from)
    rows, length, _ = keys.shape
    count = ref.queries.shape[1]
    keys_t = keys.float().transpose(1, 2)
    shift = keys.new_zeros(rows, count, dtype=torch.float32)
    mass = torch.zeros_like(shift)
    outputs = values.new_zeros(rows, count, values.shape[-1], dtype=torch.float32)
    squares = keys.new_zeros(rows, length, dtype=torch.float32)
    for start in range(0, count, chunk):
        part = slice(start, min(count, start + chunk))
        logits = torch.bmm(ref.queries[:, part], keys_t)
        seen = visibility(token_from, ref.positions[part])
        if seen is not None:
            logits = logits.masked_fill(~seen, float("-inf"))
        top = logits.amax(dim=-1, keepdim=True)
        top = torch.where(top.isfinite(), top, torch.zeros_like(top))
        weights = (logits - top).exp()
        total = weights.sum(dim=-1, keepdim=True)
        probabilities = weights / total.clamp_min(1e-30)
        shift[:, part] = top.squeeze(-1)
        mass[:, part] = total.squeeze(-1)
        outputs[:, part] = torch.bmm(probabilities, values.float())
        squares += probabilities.square().sum(dim=1)
    return Targets(shift, mass, outputs, (squares / count).sqrt(), mass > 0)


def _fused_targets(ref: ReferenceQueries, keys: torch.Tensor, values: torch.Tensor, token_from: torch.Tensor | None) -> Targets:
    """One flash pass over the keys every reference query may see (no mask), one masked pass over the
    rest, joined by their log-normalisers: the same result as one masked pass, without a [N, R, T] mask
    when the queries are the prompt's last positions (then the masked rest is a short tail)."""
    shared = keys_seen_by_every_query(token_from, ref.positions, keys.shape[1])
    rows, count = ref.queries.shape[:2]
    if shared == 0:
        return _masked_targets(ref, keys, values, token_from)
    queries = ref.queries.unsqueeze(1)  # the queries carry the attention scaling already
    outputs, lse = kernels.masked_attention_with_lse(
        queries, keys[:, :shared].float().unsqueeze(1), values[:, :shared].float().unsqueeze(1), None, 1.0
    )
    outputs, lse = outputs[:, 0].float(), lse[:, 0].float()
    if shared < keys.shape[1]:
        tail = _masked_targets(ref, keys[:, shared:], values[:, shared:], token_from[:, shared:])
        tail_lse = torch.where(tail.visible, tail.shift, torch.full_like(tail.shift, float("-inf")))
        joined = torch.logaddexp(lse, tail_lse)
        outputs = outputs * (lse - joined).exp().unsqueeze(-1) + tail.outputs * (tail_lse - joined).exp().unsqueeze(-1)
        lse = joined
    visible = torch.ones(rows, count, dtype=torch.bool, device=keys.device)
    return Targets(lse, visible.float(), outputs, None, visible)


def keys_seen_by_every_query(token_from: torch.Tensor | None, positions: torch.Tensor, length: int) -> int:
    """How many leading keys every query may see: all `length` without a restriction, else the shortest
    row's prefix of keys visible from the earliest query (`token_from` never decreases along a row:
    it is the end of each token's contiguous set)."""
    if token_from is None:
        return length
    earliest = positions.min()
    return int((token_from <= earliest).sum(dim=-1).min())


def _masked_targets(ref: ReferenceQueries, keys: torch.Tensor, values: torch.Tensor, token_from: torch.Tensor | None) -> Targets:
    seen = visibility(token_from, ref.positions)  # [N, R, T] or None
    outputs, lse = kernels.masked_attention_with_lse(
        ref.queries.unsqueeze(1), keys.float().unsqueeze(1), values.float().unsqueeze(1),
        None if seen is None else seen.unsqueeze(1), 1.0,
    )  # the queries carry the attention scaling already
    visible = seen.any(dim=-1) if seen is not None else torch.ones_like(lse[:, 0], dtype=torch.bool)
    shift = torch.where(visible, lse[:, 0].float(), torch.zeros_like(lse[:, 0]))
    outputs = outputs[:, 0].float().masked_fill(~visible.unsqueeze(-1), 0.0)
    return Targets(shift, visible.float(), outputs, None, visible)


def slot_features(
    ref: ReferenceQueries, slot_keys: torch.Tensor, shift: torch.Tensor, slot_from: torch.Tensor | None
) -> torch.Tensor:
    """[N, R, S]: exp(q_r . k_s - shift_r), zero where query r may not see slot s."""
    logits = torch.baddbmm(shift.unsqueeze(-1), ref.queries, slot_keys.float().transpose(1, 2), beta=-1.0)
    features = logits.clamp_max_(80.0).exp_()  # a slot key is never above its tokens' max logit; guard anyway
    seen = visibility(slot_from, ref.positions)
    return features if seen is None else features.masked_fill_(~seen, 0.0)


# --------------------------------------------------------------------------------------------
# The two fits
# --------------------------------------------------------------------------------------------


def ridge_correction(
    design: torch.Tensor, residual: torch.Tensor, ridge: float, columns: torch.Tensor | None = None
) -> torch.Tensor:
    """argmin_D ||design @ D - residual||^2 + lam ||D||^2, batched; design [N, R, S], residual [N, R, c].

    lam = max(ridge, RIDGE_FLOOR) * trace(design^T design) / S, where S is each row's `columns` ([N];
    default all S: rows whose last columns are zero padding get the lam they would have alone).
    Solved in the smaller of the primal (S x S) and dual (R x R) normal systems by Cholesky, in float32.
    """
    rows, count, slots = design.shape
    primal = count >= slots
    gram = design.transpose(1, 2) @ design if primal else design @ design.transpose(1, 2)
    real = slots if columns is None else columns.clamp_min(1).to(gram.dtype)
    mean_eigenvalue = gram.diagonal(dim1=1, dim2=2).sum(dim=-1) / real  # either Gram's trace is ||design||_F^2
    lam = (max(ridge, RIDGE_FLOOR) * mean_eigenvalue).clamp_min(1e-30).view(rows, 1, 1)
    if primal:
        return _positive_solve(gram, design.transpose(1, 2) @ residual, lam)
    return design.transpose(1, 2) @ _positive_solve(gram, residual, lam)


def _positive_solve(gram: torch.Tensor, rhs: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Solve (gram + lam I) X = rhs for symmetric positive semi-definite `gram`; more ridge where float32
    Cholesky fails."""
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    gram = 0.5 * (gram + gram.transpose(1, 2))
    for boost in (1.0, 1e2, 1e4):
        factor, info = torch.linalg.cholesky_ex(gram + boost * lam * eye)
        if not bool(info.any()):
            return torch.cholesky_solve(rhs, factor)
    return torch.linalg.lstsq(gram + boost * lam * eye, rhs).solution


def relative_scale(mass: torch.Tensor) -> torch.Tensor:
    """1 / mass where the mass is positive, else 0: each query's equation divided by its target mass."""
    return torch.where(mass > 0, 1.0 / mass.clamp_min(1e-30), torch.zeros_like(mass))


def fit_slot_weights(
    features: torch.Tensor,
    mass: torch.Tensor,
    prior: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    ridge: float,
    steps: int,
    relative: bool,
    columns: torch.Tensor | None = None,
) -> torch.Tensor:
    """Non-negative (boxed) least squares for the slot weights w = exp(bias), batched over rows.

    min_w ||M w - y||^2 + lam ||w - prior||^2 subject to lower <= w <= upper, with M = features
    [N, R, S], y = mass [N, R]; `relative` divides each query's equation by its target mass (every
    query counts by its relative mass error). Closed form (ridge correction of the prior), clamped to
    the box; if the clamped prior is better on this objective, start from it instead; then `steps`
    projected-gradient steps of size 1 / (L + lam), L an upper bound of ||M||_2^2 (so every step
    decreases the objective). `columns` ([N], default S): each row's real slots, for the ridge (see
    `ridge_correction`); padding slots need zero features and a box of [0, 0]. Returns [N, S] float32.
    """
    design, target = features, mass
    if relative:
        scale = relative_scale(mass)
        design, target = features * scale.unsqueeze(-1), mass * scale
    slots = design.shape[-1] if columns is None else columns.clamp_min(1).to(design.dtype)
    lam = max(ridge, RIDGE_FLOOR) * torch.linalg.vector_norm(design, dim=(1, 2)).square() / slots
    residual = target - (design @ prior.unsqueeze(-1)).squeeze(-1)
    solved = prior + ridge_correction(design, residual.unsqueeze(-1), ridge, columns).squeeze(-1)
    start = torch.minimum(torch.maximum(solved, lower), upper)

    def objective(w: torch.Tensor) -> torch.Tensor:
        fit = (design @ w.unsqueeze(-1)).squeeze(-1) - target
        return fit.square().sum(-1) + lam * (w - prior).square().sum(-1)

    at_prior = residual.square().sum(-1)  # objective(prior): the fit's error, no ridge term
    weights = torch.where((objective(start) <= at_prior).unsqueeze(-1), start, prior)
    if steps:
        step = 1.0 / (_spectral_bound(design) + lam).clamp_min(1e-30)
        for _ in range(steps):
            fit = (design @ weights.unsqueeze(-1)).squeeze(-1) - target
            gradient = (design.transpose(1, 2) @ fit.unsqueeze(-1)).squeeze(-1) + lam.unsqueeze(-1) * (weights - prior)
            weights = torch.minimum(torch.maximum(weights - step.unsqueeze(-1) * gradient, lower), upper)
    return weights


def _spectral_bound(design: torch.Tensor) -> torch.Tensor:
    """[N]: an upper bound of ||design||_2^2, the largest column sum times the largest row sum of
    `design`, which is non-negative (exp features, scaled by positive numbers); tight for the
    near-rank-one exp features of attention."""
    return design.sum(dim=1).amax(dim=-1) * design.sum(dim=2).amax(dim=-1)


def slot_attention(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[N, R, S]: each query's softmax over the slots it sees, with the slots' biases log(weights)."""
    scaled = features * weights.unsqueeze(1)
    return scaled / scaled.sum(dim=-1, keepdim=True).clamp_min(1e-30)


def fit_slot_values(
    features: torch.Tensor, weights: torch.Tensor, outputs: torch.Tensor, prior: torch.Tensor, ridge: float,
    columns: torch.Tensor | None = None,
) -> torch.Tensor:
    """Least squares for the slot values so that the compressed attention reproduces `outputs`.

    min_C ||X C - Y||^2 + lam ||C - prior||^2 with X = slot_attention(features, weights) [N, R, S],
    Y = outputs [N, R, dv], prior [N, S, dv] (all in the row's value units); `columns` as in
    `ridge_correction`. Returns [N, S, dv].
    """
    attention = slot_attention(features, weights)
    residual = outputs - attention @ prior
    return prior + ridge_correction(attention, residual, ridge, columns)


def fit_report(
    features: torch.Tensor, targets: Targets, prior_weights: torch.Tensor, prior_values: torch.Tensor,
    weights: torch.Tensor, values: torch.Tensor,
) -> dict[str, float]:
    """Mean relative errors of mass and outputs on the reference queries, before and after fitting.

    One product with the features gives both fits' masses (sum_s f_rs w_s) and weighted value sums
    (sum_s f_rs w_s v_s), so the report reads the [N, R, S] features once."""
    dv = values.shape[-1]
    unfitted, fitted = prior_weights.unsqueeze(-1), weights.unsqueeze(-1)
    per_slot = torch.cat([unfitted, unfitted * prior_values, fitted, fitted * values], dim=-1)
    sums = features @ per_slot  # [N, R, 2 + 2 dv]
    seen = targets.visible
    scale = targets.outputs.norm(dim=-1).clamp_min(1e-12)

    def errors(first: int) -> tuple[float, float]:
        mass = sums[..., first]
        mass_error = ((mass - targets.mass).abs() / targets.mass.clamp_min(1e-30))[seen]
        out = sums[..., first + 1 : first + 1 + dv] / mass.clamp_min(1e-30).unsqueeze(-1)  # slot_attention @ v
        output_error = ((out - targets.outputs).norm(dim=-1) / scale)[seen]
        return float(mass_error.mean()), float(output_error.mean())

    before = errors(0)
    after = errors(1 + dv)
    return {
        "mass_error_unfitted": before[0],
        "mass_error_fitted": after[0],
        "output_error_unfitted": before[1],
        "output_error_fitted": after[1],
    }


def validate_fit_fields(method: CompressionMethod) -> None:
    """Checks shared by the fitted methods (fields reference_queries, recent_queries, ridge,
    bias_ridge, nnls_steps, seed)."""
    count = method.reference_queries
    if count is not None and (not isinstance(count, int) or count < 1):
        raise ValueError(
            f"reference_queries must be a positive number of prompt positions (or None: all), got {count!r}"
        )
    if not isinstance(method.recent_queries, int) or method.recent_queries < 1:
        raise ValueError(
            f"recent_queries must be at least 1 (the last prompt query is always used), got {method.recent_queries!r}"
        )
    for name in ("ridge", "bias_ridge"):
        value = getattr(method, name)
        if not isinstance(value, (int, float)) or not value >= 0 or not math.isfinite(value):
            raise ValueError(
                f"{name} must be a finite number >= 0 (relative to the mean eigenvalue), got {value!r}"
            )
    if not isinstance(method.nnls_steps, int) or method.nnls_steps < 0:
        raise ValueError(
            f"nnls_steps must be a whole number >= 0 of projected-gradient steps, got {method.nnls_steps!r}"
        )


# --------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------


@dataclass
class AttentionMatching(CompressionMethod):
    """Keep the keys most attended by reference queries; fit per-slot biases (NNLS) and values (least
    squares) so that attention mass and outputs match the full cache (Zweiger et al., 2026)."""

    name: ClassVar[str] = "attention-matching"
    summary: ClassVar[str] = (
        "Attention matching (Zweiger et al. 2026): top-RMS-attention keys, fitted biases and values"
    )

    budget: float = 0.5
    reference_queries: int | None = 256  # prompt positions (each gives one query per query head)
    recent_queries: int = 256
    causal: bool = False
    bias_bound: float = 3.0  # weights in [e^-bound, e^bound], the reference code's box
    nnls_steps: int = 2
    bias_ridge: float = 0.0
    ridge: float = 0.0  # relative; 0: the paper's unregularised value fit; 0.1: our guard (see the docstring)
    seed: int = 0
    reference: str = "prompt"

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_fit_fields(self)
        check_reference(self.reference)
        if not isinstance(self.bias_bound, (int, float)) or not 0 < self.bias_bound <= 80:
            raise ValueError(f"bias_bound must be in (0, 80] (weights in [e^-bound, e^bound]), got {self.bias_bound!r}")

    def stores_bias(self) -> bool:
        return True

    def needs_reconstruction(self) -> bool:
        return self.reference == "reconstruction"

    def compress(self, layer: LayerInput) -> LayerOutput:
        batch, heads, length, dim = layer.keys.shape
        rows = batch * heads
        keys, values = layer.rows()
        scale = row_scale(values)
        ref = reference_queries(layer.scores, self.reference_queries, self.recent_queries, self.seed, self.reference)
        token_from = torch.arange(length, device=keys.device).expand(rows, length) if self.causal else None
        targets = full_cache_targets(ref, keys, values.float() / scale, token_from)

        keep = top_indices(targets.attention_rms, layer.slots).sort(dim=-1).values  # [N, S]
        kept_keys = keys.gather(1, keep.unsqueeze(-1).expand(-1, -1, dim))
        kept_values = values.float().gather(1, keep.unsqueeze(-1).expand(-1, -1, values.shape[-1])) / scale
        features = slot_features(ref, kept_keys, targets.shift, keep if self.causal else None)

        ones = torch.ones_like(keep, dtype=torch.float32)
        weights = fit_slot_weights(
            features, targets.mass, ones, ones * math.exp(-self.bias_bound), ones * math.exp(self.bias_bound),
            self.bias_ridge, self.nnls_steps, relative=False,
        )
        fitted = fit_slot_values(features, weights, targets.outputs, kept_values, self.ridge)
        notes = fit_report(features, targets, ones, kept_values, weights, fitted)
        notes["reference_queries"] = int(ref.queries.shape[1])
        return LayerOutput(
            keys=kept_keys.reshape(batch, heads, -1, dim),
            values=finite_as(fitted * scale, layer.values.dtype).reshape(batch, heads, layer.slots, -1),
            positions=keep.reshape(batch, heads, -1),
            bias=weights.log().reshape(batch, heads, -1),
            notes=notes,
        )
