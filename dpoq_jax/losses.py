"""DPO-family, reference-free and outcome-label losses, with TRL-named metrics (pure array functions).

Inputs are per-token log-probs [B, T] of the chosen and rejected responses (0 where masked), so
per-token implicit rewards come for free. Means are over real pairs of the *global* batch: under
jax.jit with sharded inputs an ordinary mean already is; under shard_map/pmap pass `axis_name` and
the sums are psum-ed over that axis.

Loss types carry TRL 1.16 DPOTrainer's names and definitions (`loss_type`, `loss_weights`,
`ld_alpha`, `use_weighting`, `f_divergence_type`), plus `cdpo` (ours), the reference-free
`simpo` and `orpo`, and three token-level families that take one more per-token input each:
`tdpo` (per-token KL(π_ref ‖ π), tokenq.lean_token_kl), `token_weighted` (TIS-DPO's token weights)
and `selective` (SePO: oracle token rewards pick the tokens). docs/losses.md has the table: formula,
what each needs, and the test.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dpoq_jax import tokenq
from dpoq_jax.tokenq import _f32

Array = jax.Array
# TRL 1.16 DPOTrainer's loss types, in its order, then ours.
TRL_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)  # fmt: skip
REFERENCE_FREE_TYPES = ("simpo", "orpo")
# Token-level losses, each with one more per-token input (preference_loss's optional arguments):
# TDPO (Zeng et al., ICML 2024): the per-token KL(π_ref ‖ π) of both responses; TIS-DPO (Liu et al.,
# ICLR 2025): token weights of both responses; SePO (Yang et al. 2024): oracle token rewards of both
# responses, which select the tokens of a reference-free SimPO-like loss.
TOKEN_LEVEL_TYPES = ("tdpo", "token_weighted", "selective")
# Losses of single responses with outcome labels ({"prompt", "completion", "label"} rows, or pairs
# unpaired into a good and a bad response): Yuan et al. 2024's cross-entropy, and TRL 1.16
# KTOTrainer's `apo_zero_unpaired`. They are used alone, never in a mixture with pairwise types.
UNPAIRED_TYPES = ("outcome_ce", "apo_zero_unpaired")
LOSS_TYPES = TRL_LOSS_TYPES + ("cdpo",) + REFERENCE_FREE_TYPES + TOKEN_LEVEL_TYPES + UNPAIRED_TYPES
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# Only losses of the chosen−rejected score difference admit an f-divergence (TRL's rule: the β log Z(x)
# of the f-DPO reparameterisation cancels only there).
F_DIVERGENCE_TYPES = (
    "sigmoid",
    "sigmoid_norm",
    "hinge",
    "ipo",
    "exo_pair",
    "robust",
    "discopop",
    "sft",
    "cdpo",
)
_SORTING_TYPES = ("aot", "aot_unpaired")
_NO_REFERENCE = REFERENCE_FREE_TYPES + ("sft", "selective")
TDPO_VARIANTS = (1, 2)
# What a token cache's per-token values are (train/setup sets it from the cache's kind): an oracle's token
# rewards (token_weighted turns them into TIS-DPO weights; selective ranks by them) or weights as such.
TOKEN_VALUE_KINDS = ("rewards", "weights")


def parse_types(loss_type: str | Sequence[str]) -> tuple[str, ...]:
    """ "sigmoid" or "sigmoid,bco_pair,sft" or a sequence of names -> tuple of names."""
    if isinstance(loss_type, str):
        return tuple(t.strip() for t in loss_type.split(",") if t.strip())
    return tuple(loss_type)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """beta: β (ORPO: its λ, as TRL's ORPOConfig.beta). loss_type: one name of LOSS_TYPES, or several
    (comma string or sequence) summed with `loss_weights` (default all 1; TRL's MPO mixtures).
    label_smoothing: ε of cdpo/robust/exo_pair/aot*. ipo_average: IPO (and sigmoid_norm-like) on
    per-token averaged scores as TRL does. sft_weight: NLL (mean over chosen tokens) added on top.
    ld_alpha: LD-DPO's α, response tokens past the shorter response's length count α (1 = off).
    use_weighting: WPO pair weights (needs the policy's per-token log Σ_v p_v²).
    f_divergence_type / f_alpha_divergence_coef: TRL's f-DPO scores. discopop_tau: DiscoPOP's τ.
    simpo_gamma: SimPO's target margin γ (also SePO's, `selective`). desirable_weight /
    undesirable_weight: KTO's λ_D / λ_U, the weights of good and bad responses in the unpaired losses
    (UNPAIRED_TYPES). tdpo_variant: 1 (TDPO1) or 2 (TDPO2, the official default); tdpo_alpha: TDPO2's
    α, the weight of the sequential-KL difference (unused by TDPO1). select_ratio: SePO's token
    fraction k in (0, 1] (top k of each chosen, bottom k of each rejected response)."""

    beta: float = 0.1
    loss_type: str | tuple[str, ...] = "sigmoid"
    loss_weights: tuple[float, ...] = ()
    label_smoothing: float = 0.0
    ipo_average: bool = True
    sft_weight: float = 0.0
    ld_alpha: float = 1.0
    use_weighting: bool = False
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    simpo_gamma: float = 0.5
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    tdpo_alpha: float = 0.5
    tdpo_variant: int = 2
    select_ratio: float = 0.3
    tis_mu: float = 1.0
    tis_lower: float = -1.0
    tis_upper: float = 1.0
    token_values: str = "rewards"

    def __post_init__(self) -> None:
        types = self.types
        bad = [t for t in types if t not in LOSS_TYPES]
        if bad or not types:
            raise ValueError(
                f"LossConfig.loss_type must be one of {LOSS_TYPES} (a comma list for a mixture), got "
                f"{self.loss_type!r}: unknown {bad or 'empty'}"
            )
        if self.loss_weights and len(self.loss_weights) != len(types):
            raise ValueError(
                f"LossConfig.loss_weights has {len(self.loss_weights)} weights for the {len(types)} types "
                f"of loss_type={self.loss_type!r}"
            )
        if not self.beta > 0:
            raise ValueError(f"LossConfig.beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"LossConfig.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if "exo_pair" in types and self.label_smoothing <= 0:
            raise ValueError(
                "LossConfig.label_smoothing must be > 0 for loss_type 'exo_pair' (EXO suggests 1e-3)"
            )
        if self.sft_weight < 0:
            raise ValueError(f"LossConfig.sft_weight must be >= 0, got {self.sft_weight}")
        if not 0.0 <= self.ld_alpha <= 1.0:
            raise ValueError(f"LossConfig.ld_alpha must be in [0, 1], got {self.ld_alpha}")
        if self.f_divergence_type not in F_DIVERGENCES:
            raise ValueError(
                f"LossConfig.f_divergence_type must be one of {F_DIVERGENCES}, got {self.f_divergence_type!r}"
            )
        if self.f_divergence_type != "reverse_kl" and not set(types) <= set(F_DIVERGENCE_TYPES):
            raise ValueError(
                f"LossConfig.f_divergence_type={self.f_divergence_type!r} works only with "
                f"{F_DIVERGENCE_TYPES}, got {types}"
            )
        if self.use_weighting and set(types) & set(_SORTING_TYPES):
            raise ValueError(
                "LossConfig.use_weighting does not combine with 'aot'/'aot_unpaired' (they sort pairs)"
            )
        if self.discopop_tau <= 0:
            raise ValueError(f"LossConfig.discopop_tau must be > 0, got {self.discopop_tau}")
        if self.desirable_weight < 0 or self.undesirable_weight < 0:
            raise ValueError("LossConfig.desirable_weight and undesirable_weight must be >= 0, got "
                             f"{self.desirable_weight}, {self.undesirable_weight}")
        self._check_token_level(types)
        if set(types) & set(UNPAIRED_TYPES):
            self._check_unpaired(types)

    def _check_token_level(self, types: tuple[str, ...]) -> None:
        """TDPO's variant and α, SePO's ratio; LD-DPO's weights do not combine with token-level types
        (they would be a second, conflicting set of token weights)."""
        v = self.tdpo_variant
        if isinstance(v, bool) or v not in TDPO_VARIANTS:
            raise ValueError(f"LossConfig.tdpo_variant must be 1 or 2, got {v!r}")
        if not (math.isfinite(self.tdpo_alpha) and self.tdpo_alpha >= 0):
            raise ValueError(f"LossConfig.tdpo_alpha must be a finite number >= 0, got {self.tdpo_alpha}")
        if not (math.isfinite(self.select_ratio) and 0.0 < self.select_ratio <= 1.0):
            raise ValueError(f"LossConfig.select_ratio must be in (0, 1], got {self.select_ratio}")
        if not (math.isfinite(self.tis_mu) and self.tis_mu >= 0):
            raise ValueError(f"LossConfig.tis_mu must be a finite number >= 0, got {self.tis_mu}")
        lo, hi = self.tis_lower, self.tis_upper
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise ValueError(f"LossConfig.tis_lower must be <= tis_upper (finite), got {self.tis_lower}, "
                             f"{self.tis_upper}")
        if self.token_values not in TOKEN_VALUE_KINDS:
            raise ValueError(
                f"LossConfig.token_values must be one of {TOKEN_VALUE_KINDS}, got {self.token_values!r}"
            )
        if "selective" in types and self.token_values != "rewards":
            raise ValueError("LossConfig: loss_type 'selective' ranks tokens by oracle rewards; token_values "
                             f"must be 'rewards', got {self.token_values!r}")
        token_level = [t for t in types if t in TOKEN_LEVEL_TYPES]
        if token_level and self.ld_alpha != 1.0:
            raise ValueError(
                f"LossConfig.ld_alpha={self.ld_alpha} does not combine with token-level loss types "
                f"{token_level} (they set their own token weights or selection)"
            )

    def _check_unpaired(self, types: tuple[str, ...]) -> None:
        """An unpaired type stands alone: the pairwise options have no meaning for single responses."""
        if len(types) > 1:
            raise ValueError(
                f"LossConfig.loss_type={self.loss_type!r}: {UNPAIRED_TYPES} train on single labelled "
                "responses and do not mix with other types"
            )
        pairwise = {"ld_alpha": self.ld_alpha != 1.0, "use_weighting": self.use_weighting,
                    "sft_weight": self.sft_weight != 0.0, "label_smoothing": self.label_smoothing != 0.0,
                    "f_divergence_type": self.f_divergence_type != "reverse_kl"}  # fmt: skip
        bad = [k for k, on in pairwise.items() if on]
        if bad:
            raise ValueError(f"LossConfig.{bad[0]} is a pairwise option; loss_type {types[0]!r} has no pairs")

    @property
    def types(self) -> tuple[str, ...]:
        return parse_types(self.loss_type)

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(self.loss_weights) or (1.0,) * len(self.types)

    @property
    def unpaired(self) -> bool:
        """True for the outcome-label losses: the data are single responses with labels."""
        return self.types[0] in UNPAIRED_TYPES

    @property
    def needs_reference(self) -> bool:
        """False when every loss type is reference-free (simpo, orpo, sft, selective): no reference
        forward at all."""
        return not set(self.types) <= set(_NO_REFERENCE)

    @property
    def needs_token_kl(self) -> bool:
        """True for `tdpo`: preference_loss needs kl_chosen_BT / kl_rejected_BT (tokenq.lean_token_kl)."""
        return "tdpo" in self.types

    @property
    def needs_token_weights(self) -> bool:
        """True for `token_weighted`: preference_loss needs chosen_weights_BT / rejected_weights_BT."""
        return "token_weighted" in self.types

    @property
    def needs_oracle_rewards(self) -> bool:
        """True for `selective`: preference_loss needs chosen_oracle_BT / rejected_oracle_BT."""
        return "selective" in self.types


def _psum(x: Array, axis_name: str | None) -> Array:
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def _global_mean(x_B: Array, w_B: Array, axis_name: str | None) -> Array:
    """Weighted mean over the global batch; 0 if it has no real entries."""
    num = _psum(jnp.sum(x_B * w_B), axis_name)
    den = _psum(jnp.sum(w_B), axis_name)
    return num / jnp.maximum(den, 1e-12)


def _global_min(x: Array, axis_name: str | None) -> Array:
    m = jnp.min(x)
    return m if axis_name is None else jax.lax.pmin(m, axis_name)


def _ref_sum(ref: Array, w_BT: Array, name: str) -> Array:
    if ref.ndim == 2:
        return tokenq.masked_sum(_f32(ref), w_BT)
    if ref.ndim == 1:
        return _f32(ref)
    raise ValueError(
        f"preference_loss: {name} must be per-token [B, T] or per-response sums [B], got {ref.shape}"
    )


def ld_token_weights(chosen_mask_BT: Array, rejected_mask_BT: Array, alpha: float) -> tuple[Array, Array]:
    """LD-DPO token weights: w_t = 1 for the first min(|y_w|, |y_l|) response tokens, α after, 0 masked."""
    cm_BT, rm_BT = chosen_mask_BT.astype(jnp.float32), rejected_mask_BT.astype(jnp.float32)
    shared_B = jnp.minimum(jnp.sum(cm_BT, -1), jnp.sum(rm_BT, -1))[:, None]
    out = []
    for m_BT in (cm_BT, rm_BT):
        pos_BT = jnp.cumsum(m_BT, -1)  # 1-based index among the response's real tokens
        out.append(jnp.where(pos_BT <= shared_B, 1.0, alpha) * m_BT)
    return out[0], out[1]


def f_divergence_scores(logratio_B: Array, kind: str, alpha_coef: float = 0.5) -> Array:
    """f'(π/π_ref) of f-DPO at log-ratio u: reverse_kl u; forward_kl 1 − e^{−u}; js_divergence
    log 2 + log σ(u); alpha_divergence (e^{(α−1)u} − 1)/(α−1) (exponent clamped at 80)."""
    if kind == "reverse_kl":
        return logratio_B
    if kind == "forward_kl":
        return 1.0 - jnp.exp(-logratio_B)
    if kind == "js_divergence":
        return math.log(2.0) + jax.nn.log_sigmoid(logratio_B)
    if kind == "alpha_divergence":
        if abs(alpha_coef - 1.0) < 1e-6:  # the α → 1 limit is log t
            return logratio_B
        t_B = jnp.minimum((alpha_coef - 1.0) * logratio_B, 80.0)
        return (jnp.exp(t_B) - 1.0) / (alpha_coef - 1.0)
    raise ValueError(f"unknown f_divergence_type {kind!r}")


def wpo_weights(logps_BT: Array, log_sum_sq_BT: Array, mask_BT: Array) -> Array:
    """WPO weight of a response, exp(mean_t [log π(y_t) − log Σ_v π(v)²]) (no gradient) -> [B]."""
    m_BT = mask_BT.astype(jnp.float32)
    aligned_BT = jax.lax.stop_gradient((_f32(logps_BT) - _f32(log_sum_sq_BT)) * m_BT)
    return jnp.exp(jnp.sum(aligned_BT, -1) / jnp.maximum(jnp.sum(m_BT, -1), 1.0))


def tis_weights(d_BT: Array, mask_BT: Array, *, chosen: bool, lower: float, upper: float, mu: float = 1.0,
                k: float = 1.0) -> Array:  # fmt: skip
    """TIS-DPO's token weights from per-token reward estimates d_t -> [B, T] (no gradient, 0 where masked).

    TIS-DPO: Token-level Importance Sampling for Direct Preference Optimization With Estimated
    Weights (Liu et al., ICLR 2025, arXiv 2410.04350), §4 weight estimation: with π+ / π− the
    "positive" / "negative" model of a contrastive pair (e.g. DPO and reverse-DPO on the same data),
    d_t = log π+(y_t|s_t) − log π−(y_t|s_t) and

        chosen (winning) tokens:    w_t = k · exp( μ · clamp(d_t, L, U))
        rejected (losing) tokens:   w_t = k · exp(−μ · clamp(d_t, L, U))

    so a chosen token that the positive model prefers, and a rejected token that the negative model
    prefers, weigh more. Any token-reward estimate can stand in for d_t (an oracle's β·log π/π_ref, the
    true rewards of a synthetic task). The paper's text past its abstract was not readable through our
    tools; the formula is the paper's as we know it, and its sign convention is checked against the
    public code of the method (forks of github.com/exlaw/TIS-DPO: `token_weight_estimation.py` stores
    log π− − log π+ per token and the data loader negates it for chosen responses; `trainers.py`
    multiplies each token's log π/π_ref by its weight before summing, as `token_weighted` does here).
    """
    if not lower <= upper:
        raise ValueError(f"tis_weights: lower must be <= upper, got {lower} > {upper}")
    d_BT = jax.lax.stop_gradient(_f32(d_BT))
    m_BT = mask_BT.astype(d_BT.dtype)
    d_BT = jnp.where(m_BT > 0, d_BT, 0.0)  # padding may hold anything
    sign = 1.0 if chosen else -1.0
    return k * jnp.exp(sign * mu * jnp.clip(d_BT, lower, upper)) * m_BT


def tis_dpo_weights(
    pos_logps_BT: Array,
    neg_logps_BT: Array,
    mask_BT: Array,
    *,
    chosen: bool,
    lower: float,
    upper: float,
    mu: float = 1.0,
    k: float = 1.0,
) -> Array:
    """tis_weights of d_t = log π+(y_t) − log π−(y_t) from the contrastive pair's per-token log-probs.
    L = `lower`, U = `upper` have no default here on purpose: choose them (and μ, k) for the run."""
    d_BT = _f32(pos_logps_BT) - _f32(neg_logps_BT)
    return tis_weights(d_BT, mask_BT, chosen=chosen, lower=lower, upper=upper, mu=mu, k=k)


def select_ratio_counts(n_max: int, ratio: float) -> np.ndarray:
    """k(n) for n = 0..n_max real tokens: 0 for n = 0, else max(1, ⌊ratio·n + 1e-9⌋) (SePO's
    int(ratio·N), at least one token; the 1e-9 makes e.g. 0.29·100 = 28.999… count 29)."""
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0.0 < ratio <= 1.0:
        raise ValueError(f"select_tokens: ratio must be a number in (0, 1], got {ratio!r}")
    return np.array([0] + [max(1, math.floor(ratio * n + 1e-9)) for n in range(1, n_max + 1)], np.int32)


def select_tokens(rewards_BT: Array, mask_BT: Array, ratio: float, top: bool) -> Array:
    """SePO's token selection -> selected_mask_BT (float32 0/1, no gradient).

    Per response (row), among its real tokens (mask > 0) only, keep the k = max(1, ⌊ratio·n⌋) tokens
    with the highest (`top=True`, chosen responses) or lowest (`top=False`, rejected responses)
    reward, n the row's number of real tokens (see select_ratio_counts; 0 for an empty row). Ties go
    to the earlier position (a stable sort), so the selection is deterministic. `ratio` is a static
    Python number; ratio = 1 selects exactly the mask.
    """
    if rewards_BT.ndim != 2 or mask_BT.shape != rewards_BT.shape:
        raise ValueError(
            f"select_tokens: rewards_BT and mask_BT must be [B, T] alike, got {rewards_BT.shape}, "
            f"{mask_BT.shape}"
        )
    table_N = jnp.asarray(select_ratio_counts(rewards_BT.shape[1], ratio))
    real_BT = mask_BT > 0
    k_B = table_N[jnp.sum(real_BT, axis=-1)]
    r_BT = jax.lax.stop_gradient(_f32(rewards_BT))
    key_BT = -r_BT if top else r_BT
    key_BT = jnp.where(key_BT == 0, 0.0, key_BT)  # −0.0 and 0.0 tie like any equal rewards
    # real tokens first (ascending key), then the padding; lexsort is stable: ties keep position order
    order_BT = jnp.lexsort((key_BT, jnp.logical_not(real_BT).astype(jnp.int32)), axis=-1)
    rank_BT = jnp.argsort(order_BT, axis=-1)  # the inverse permutation: each position's rank
    return ((rank_BT < k_B[:, None]) & real_BT).astype(jnp.float32)


def _log1mexp(x: Array) -> Array:
    """log(1 − e^x) for x < 0, accurate at both ends."""
    return jnp.where(x > -math.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def _sorted_real(x_B: Array, real_B: Array) -> Array:
    """Values of real entries sorted ascending and moved to the front (the rest: 0)."""
    n = jnp.sum(real_B)
    s_B = jnp.sort(jnp.where(real_B, x_B, jnp.inf))
    return jnp.where(jnp.arange(x_B.shape[0]) < n, s_B, 0.0)


def pair_losses(h_B: Array, config: LossConfig) -> Array:
    """Per-pair loss of the (β-free) log-ratio margin h; one margin-only type, no f-divergence."""
    (t,) = config.types
    return _margin_loss(t, h_B, config)


def _margin_loss(t: str, d_B: Array, config: LossConfig) -> Array:
    """Loss of a score margin d (chosen − rejected), the types that see only d."""
    beta, eps = config.beta, config.label_smoothing
    z = beta * d_B
    if t == "sigmoid" or t == "sigmoid_norm":  # sigmoid_norm: d of per-token averaged scores
        return -jax.nn.log_sigmoid(z)
    if t == "cdpo":  # labels flipped with probability ε
        return -(1 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)
    if t == "robust":  # unbiased under label noise ε (Chowdhury et al. 2024)
        return (-(1 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)) / (1 - 2 * eps)
    if t == "hinge":
        return jax.nn.relu(1.0 - z)
    if t == "ipo":
        return (d_B - 1.0 / (2.0 * beta)) ** 2
    if t == "exo_pair":  # KL(softmax(βd) ‖ [1−ε, ε]) over {chosen, rejected}
        return jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - math.log1p(-eps)) + jax.nn.sigmoid(-z) * (
            jax.nn.log_sigmoid(-z) - math.log(eps)
        )
    if t == "discopop":  # logistic/exponential blend, mixed by σ(βd/τ)
        mix = jax.nn.sigmoid(z / config.discopop_tau)
        return -jax.nn.log_sigmoid(z) * (1 - mix) + jnp.exp(-z) * mix
    raise ValueError(f"unknown margin loss_type {t!r}")


def _smoothed_sigmoid(z: Array, eps: float) -> Array:
    return -jax.nn.log_sigmoid(z) * (1 - eps) - jax.nn.log_sigmoid(-z) * eps


def preference_loss(
    policy_chosen_BT: Array,
    policy_rejected_BT: Array,
    ref_chosen: Array | None,
    ref_rejected: Array | None,
    chosen_mask_BT: Array,
    rejected_mask_BT: Array,
    *,
    config: LossConfig,
    pair_mask_B: Array | None = None,
    axis_name: str | None = None,
    chosen_log_sum_sq_BT: Array | None = None,
    rejected_log_sum_sq_BT: Array | None = None,
    kl_chosen_BT: Array | None = None,
    kl_rejected_BT: Array | None = None,
    chosen_weights_BT: Array | None = None,
    rejected_weights_BT: Array | None = None,
    chosen_oracle_BT: Array | None = None,
    rejected_oracle_BT: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Σ_k w_k · mean over pairs of loss_k -> (scalar loss, metrics).

    policy_*_BT: per-token policy log-probs; ref_*: per-token reference log-probs [B, T], their
    per-response sums [B] (not with ld_alpha < 1), or None for reference-free types. pair_mask_B: 1 for
    real pairs, 0 for dummy ones (non-negative weights also work, except for aot*: real = > 0).
    *_log_sum_sq_BT: the policy's log Σ_v π(v|s_t)² (tokenq.lean_log_sum_sq_probs), for use_weighting.
    Token-level metrics need per-token refs. aot/aot_unpaired sort within the (micro-)batch.
    Token-level types, one more per-token input [B, T] each (ignored at masked tokens):
    kl_*_BT: KL(π_ref(·|s_t) ‖ π(·|s_t)) per token for `tdpo` (tokenq.lean_token_kl, gradient to the
    policy; TDPO2 stops the chosen side's gradient itself); *_weights_BT: token weights w_t ≥ 0 for
    `token_weighted` (constants, e.g. tis_dpo_weights; needs per-token refs); *_oracle_BT: oracle
    token rewards for `selective` (constants; select_tokens picks the top / bottom select_ratio).
    """
    if policy_chosen_BT.ndim != 2 or policy_rejected_BT.ndim != 2:
        raise ValueError(
            f"preference_loss: policy log-probs must be [B, T], got {policy_chosen_BT.shape} "
            f"and {policy_rejected_BT.shape}"
        )
    for name, x, m in (
        ("chosen", policy_chosen_BT, chosen_mask_BT),
        ("rejected", policy_rejected_BT, rejected_mask_BT),
    ):
        if m.shape != x.shape:
            raise ValueError(
                f"preference_loss: {name}_mask_BT has shape {m.shape}, policy log-probs {x.shape}"
            )
    types, beta, eps = config.types, config.beta, config.label_smoothing
    if config.unpaired:
        raise ValueError(f"preference_loss: loss_type {types[0]!r} is unpaired; use losses.outcome_loss")
    has_ref = ref_chosen is not None and ref_rejected is not None
    if config.needs_reference and not has_ref:
        raise ValueError(f"preference_loss: loss_type {types} needs reference log-probs, got None")
    if config.ld_alpha < 1.0 and has_ref and (ref_chosen.ndim != 2 or ref_rejected.ndim != 2):
        raise ValueError("preference_loss: ld_alpha < 1 needs per-token reference log-probs [B, T], got sums")
    if config.use_weighting and (chosen_log_sum_sq_BT is None or rejected_log_sum_sq_BT is None):
        raise ValueError(
            "preference_loss: use_weighting needs chosen_log_sum_sq_BT and rejected_log_sum_sq_BT"
        )
    if axis_name is not None and set(types) & set(_SORTING_TYPES):
        raise ValueError(
            "preference_loss: aot/aot_unpaired sort the whole batch; not under shard_map (axis_name)"
        )
    token_inputs = (
        ("tdpo", "kl_chosen_BT", kl_chosen_BT, "kl_rejected_BT", kl_rejected_BT,
         "per-token KL(π_ref ‖ π), tokenq.lean_token_kl"),
        ("token_weighted", "chosen_weights_BT", chosen_weights_BT, "rejected_weights_BT",
         rejected_weights_BT, "token weights, e.g. losses.tis_dpo_weights"),
        ("selective", "chosen_oracle_BT", chosen_oracle_BT, "rejected_oracle_BT", rejected_oracle_BT,
         "oracle token rewards"),
    )  # fmt: skip
    for t, c_name, c_x, r_name, r_x, what in token_inputs:
        if t in types and (c_x is None or r_x is None):
            raise ValueError(
                f"preference_loss: loss_type {t!r} needs {c_name} and {r_name} ({what}), got None"
            )
        for name, x, like in ((c_name, c_x, policy_chosen_BT), (r_name, r_x, policy_rejected_BT)):
            if x is not None and x.shape != like.shape:
                raise ValueError(
                    f"preference_loss: {name} has shape {x.shape}, policy log-probs {like.shape}"
                )
    if "token_weighted" in types and has_ref and (ref_chosen.ndim != 2 or ref_rejected.ndim != 2):
        raise ValueError(
            "preference_loss: loss_type 'token_weighted' needs per-token reference log-probs [B, T], got sums"
        )
    cm_BT = chosen_mask_BT.astype(jnp.float32)
    rm_BT = rejected_mask_BT.astype(jnp.float32)
    B = policy_chosen_BT.shape[0]
    pm_B = jnp.ones((B,), jnp.float32) if pair_mask_B is None else pair_mask_B.astype(jnp.float32)
    pol_c_BT = _f32(policy_chosen_BT)
    pol_r_BT = _f32(policy_rejected_BT)
    n_c_B = jnp.maximum(jnp.sum(cm_BT, -1), 1.0)
    n_r_B = jnp.maximum(jnp.sum(rm_BT, -1), 1.0)
    mean = lambda x_B: _global_mean(x_B, pm_B, axis_name)  # noqa: E731

    # LD-DPO: token weights (1 over the shared length, α after); with α = 1 they are the masks.
    wc_BT, wr_BT = (
        (cm_BT, rm_BT) if config.ld_alpha == 1.0 else ld_token_weights(cm_BT, rm_BT, config.ld_alpha)
    )
    pc_B = tokenq.masked_sum(pol_c_BT, wc_BT)
    pr_B = tokenq.masked_sum(pol_r_BT, wr_BT)
    metrics: dict[str, Array] = {}
    if has_ref:
        rc_B = _ref_sum(ref_chosen, wc_BT, "ref_chosen")
        rr_B = _ref_sum(ref_rejected, wr_BT, "ref_rejected")
        lr_c_B, lr_r_B = pc_B - rc_B, pr_B - rr_B  # log π/π_ref of each response
        sc_B = f_divergence_scores(lr_c_B, config.f_divergence_type, config.f_alpha_divergence_coef)
        sr_B = f_divergence_scores(lr_r_B, config.f_divergence_type, config.f_alpha_divergence_coef)
    avg_c_B, avg_r_B = tokenq.masked_sum(pol_c_BT, cm_BT) / n_c_B, tokenq.masked_sum(pol_r_BT, rm_BT) / n_r_B

    pair_w_B = jnp.ones((B,), jnp.float32)
    if config.use_weighting:
        pair_w_B = wpo_weights(pol_c_BT, chosen_log_sum_sq_BT, cm_BT) * wpo_weights(
            pol_r_BT, rejected_log_sum_sq_BT, rm_BT
        )
    nll = _token_mean(-pol_c_BT, cm_BT, pm_B, axis_name)

    real = lambda x_BT, m_BT: jnp.where(m_BT > 0, _f32(x_BT), 0.0)  # noqa: E731 (inf/nan padding is safe)
    if "tdpo" in types:  # sequential KL Σ_t KL(π_ref(·|s_t) ‖ π(·|s_t)) of each response
        seq_kl_c_B = tokenq.masked_sum(real(kl_chosen_BT, cm_BT), cm_BT)
        seq_kl_r_B = tokenq.masked_sum(real(kl_rejected_BT, rm_BT), rm_BT)
        metrics["tdpo/seq_kl_chosen"] = mean(seq_kl_c_B)
        metrics["tdpo/seq_kl_rejected"] = mean(seq_kl_r_B)
        # the official implementation's rewards: β(log π/π_ref + SeqKL) of each response
        metrics["tdpo/rewards_chosen"] = mean(beta * (lr_c_B + seq_kl_c_B))
        metrics["tdpo/rewards_rejected"] = mean(beta * (lr_r_B + seq_kl_r_B))
    if "token_weighted" in types:  # Σ_t w_t log π/π_ref with TIS-DPO's weights (mask · w)
        tw_c_BT = real(chosen_weights_BT, cm_BT) * cm_BT  # = the mask exactly when every weight is 1
        tw_r_BT = real(rejected_weights_BT, rm_BT) * rm_BT
        tlr_c_B = tokenq.masked_sum(pol_c_BT, tw_c_BT) - _ref_sum(ref_chosen, tw_c_BT, "ref_chosen")
        tlr_r_B = tokenq.masked_sum(pol_r_BT, tw_r_BT) - _ref_sum(ref_rejected, tw_r_BT, "ref_rejected")
        metrics["token_weighted/rewards_chosen"] = mean(beta * tlr_c_B)
        metrics["token_weighted/rewards_rejected"] = mean(beta * tlr_r_B)
        metrics["token_weighted/weight_chosen"] = _token_mean(tw_c_BT, cm_BT, pm_B, axis_name)
        metrics["token_weighted/weight_rejected"] = _token_mean(tw_r_BT, rm_BT, pm_B, axis_name)
    if "selective" in types:  # SePO: top tokens of the chosen, bottom tokens of the rejected response
        sel_c_BT = select_tokens(chosen_oracle_BT, cm_BT, config.select_ratio, top=True)
        sel_r_BT = select_tokens(rejected_oracle_BT, rm_BT, config.select_ratio, top=False)
        sel_avg_c_B = tokenq.masked_sum(pol_c_BT, sel_c_BT) / jnp.maximum(jnp.sum(sel_c_BT, -1), 1.0)
        sel_avg_r_B = tokenq.masked_sum(pol_r_BT, sel_r_BT) / jnp.maximum(jnp.sum(sel_r_BT, -1), 1.0)
        metrics["selective/logps_mean_chosen"] = mean(sel_avg_c_B)
        metrics["selective/logps_mean_rejected"] = mean(sel_avg_r_B)
        metrics["selective/fraction_chosen"] = _token_mean(sel_c_BT, cm_BT, pm_B, axis_name)
        metrics["selective/fraction_rejected"] = _token_mean(sel_r_BT, rm_BT, pm_B, axis_name)

    loss = jnp.float32(0.0)
    for t, w in zip(types, config.weights, strict=True):
        if t in ("sigmoid", "cdpo", "robust", "hinge", "discopop", "exo_pair"):
            per_B = _margin_loss(t, sc_B - sr_B, config)
        elif t in ("ipo", "sigmoid_norm"):
            avg = t == "sigmoid_norm" or config.ipo_average
            d_B = sc_B / n_c_B - sr_B / n_r_B if avg else sc_B - sr_B
            per_B = _margin_loss(t, d_B, config)
        elif t == "nca_pair":
            zc, zr = beta * lr_c_B, beta * lr_r_B
            per_B = -jax.nn.log_sigmoid(zc) - 0.5 * jax.nn.log_sigmoid(-zc) - 0.5 * jax.nn.log_sigmoid(-zr)
        elif t == "bco_pair":
            per_B = -jax.nn.log_sigmoid(beta * lr_c_B) - jax.nn.log_sigmoid(-beta * lr_r_B)
        elif t == "sppo_hard":
            per_B = (lr_c_B - 0.5 / beta) ** 2 + (lr_r_B + 0.5 / beta) ** 2
        elif t == "apo_zero":
            per_B = 1 - jax.nn.sigmoid(beta * lr_c_B) + jax.nn.sigmoid(beta * lr_r_B)
        elif t == "apo_down":
            per_B = jax.nn.sigmoid(beta * lr_c_B) + 1 - jax.nn.sigmoid(beta * (lr_c_B - lr_r_B))
        elif t in _SORTING_TYPES:  # AOT: sorted policy vs sorted reference quantiles over the batch
            real_B = pm_B > 0
            if t == "aot":
                d_B = _sorted_real(pc_B - pr_B, real_B) - _sorted_real(rc_B - rr_B, real_B)
            else:
                d_B = _sorted_real(lr_c_B, real_B) - _sorted_real(lr_r_B, real_B)
            per_B = _smoothed_sigmoid(beta * d_B, eps)
            n_real = jnp.sum(real_B)
            sorted_w_B = (jnp.arange(B) < n_real).astype(jnp.float32)
            loss = loss + w * _global_mean(per_B, sorted_w_B, axis_name)
            continue
        elif t == "sft":  # NLL per chosen token, the same for every pair
            per_B = jnp.broadcast_to(nll, (B,))
        elif t == "simpo":  # length-normalised, reference-free, target margin γ
            per_B = -jax.nn.log_sigmoid(beta * (avg_c_B - avg_r_B) - config.simpo_gamma)
        elif t == "orpo":  # NLL + β·(−log σ(log odds ratio)); the NLL is added once below
            per_B = -beta * _orpo_log_sigmoid(avg_c_B, avg_r_B, pm_B)
        elif t == "tdpo":  # TDPO1: −ls(β[Δu − (D_l − D_w)]); TDPO2: −ls(β[Δu − α(D_l − sg(D_w))])
            if config.tdpo_variant == 1:
                d_B = (lr_c_B - lr_r_B) - (seq_kl_r_B - seq_kl_c_B)
            else:
                d_B = (lr_c_B - lr_r_B) - config.tdpo_alpha * (seq_kl_r_B - jax.lax.stop_gradient(seq_kl_c_B))
            per_B = -jax.nn.log_sigmoid(beta * d_B)
        elif t == "token_weighted":  # TIS-DPO: −ls(β[Σ w_w log π/π_ref(y_w) − Σ w_l log π/π_ref(y_l)])
            per_B = -jax.nn.log_sigmoid(beta * (tlr_c_B - tlr_r_B))
        elif t == "selective":  # SePO: SimPO on the selected tokens' mean log-probs
            per_B = -jax.nn.log_sigmoid(beta * (sel_avg_c_B - sel_avg_r_B) - config.simpo_gamma)
        else:
            raise ValueError(f"unknown loss_type {t!r}")
        loss = loss + w * mean(per_B * pair_w_B)
        if t == "orpo":
            loss = loss + w * nll
            lo_B = _orpo_log_odds(avg_c_B, avg_r_B, pm_B)
            metrics["log_odds_ratio"] = mean(jax.nn.log_sigmoid(lo_B))
            metrics["log_odds_chosen"] = mean(lo_B)
            metrics["nll_loss"] = nll

    if has_ref:
        reward_c_B, reward_r_B = beta * lr_c_B, beta * lr_r_B
    else:  # SimPO's (and TRL ORPO's) reward: β × the mean per-token log-prob
        reward_c_B, reward_r_B = beta * avg_c_B, beta * avg_r_B
    metrics.update({
        "rewards/chosen": mean(reward_c_B),
        "rewards/rejected": mean(reward_r_B),
        "rewards/margins": mean(reward_c_B - reward_r_B),
        "rewards/accuracies": mean((reward_c_B > reward_r_B).astype(jnp.float32)),
        "logps/chosen": mean(pc_B),
        "logps/rejected": mean(pr_B),
        # Mean per-token log-prob of the response tokens. Not TRL's `logits/*` (the mean raw logit over
        # the vocabulary), which the loss never sees and so is not reported.
        "logps_mean/chosen": mean(avg_c_B),
        "logps_mean/rejected": mean(avg_r_B),
    })  # fmt: skip
    if config.use_weighting:
        metrics["wpo/weight"] = mean(pair_w_B)
    if config.sft_weight > 0:
        metrics["sft/nll"] = nll
        loss = loss + config.sft_weight * nll
    metrics["loss"] = loss

    if has_ref and ref_chosen.ndim == 2 and ref_rejected.ndim == 2:
        for name, logps_BT, ref_BT, m_BT in (
            ("chosen", policy_chosen_BT, ref_chosen, cm_BT),
            ("rejected", policy_rejected_BT, ref_rejected, rm_BT),
        ):
            r_BT = tokenq.implicit_rewards(logps_BT, ref_BT, m_BT, beta)
            metrics[f"token_rewards/{name}_mean"] = _token_mean(r_BT, m_BT, pm_B, axis_name)
            real_BT = (m_BT * pm_B[:, None]) > 0
            metrics[f"token_rewards/{name}_min"] = _global_min(jnp.where(real_BT, r_BT, jnp.inf), axis_name)
    return loss, metrics


def _orpo_log_odds(avg_c_B: Array, avg_r_B: Array, pm_B: Array) -> Array:
    """log odds(y_w) − log odds(y_l), odds(y) = P/(1 − P), log P = mean per-token log-prob."""
    # dummy pairs (and the impossible P = 1) would give log 0; keep them finite
    safe = lambda a_B: jnp.minimum(jnp.where(pm_B > 0, a_B, -1.0), -1e-6)  # noqa: E731
    a_c, a_r = safe(avg_c_B), safe(avg_r_B)
    return (a_c - a_r) - (_log1mexp(a_c) - _log1mexp(a_r))


def _orpo_log_sigmoid(avg_c_B: Array, avg_r_B: Array, pm_B: Array) -> Array:
    return jax.nn.log_sigmoid(_orpo_log_odds(avg_c_B, avg_r_B, pm_B))


def _token_mean(x_BT: Array, mask_BT: Array, pm_B: Array, axis_name: str | None) -> Array:
    """Mean over all real tokens of real pairs in the global batch."""
    w_BT = mask_BT * pm_B[:, None]
    num = _psum(jnp.sum(x_BT * w_BT), axis_name)
    den = _psum(jnp.sum(w_BT), axis_name)
    return num / jnp.maximum(den, 1e-12)


def outcome_loss(
    policy_BT: Array,
    ref: Array,
    mask_BT: Array,
    label_B: Array,
    *,
    beta: float,
    loss_type: str = "outcome_ce",
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    example_mask_B: Array | None = None,
    axis_name: str | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Loss of single responses with outcome labels, r = β Σ_t log π/π_ref, mean over real examples
    -> (loss, metrics). With l the label, λ_D / λ_U the desirable / undesirable weights:

      outcome_ce (Yuan et al. 2024):        −[λ_D l log σ(r) + λ_U (1−l) log σ(−r)]
      apo_zero_unpaired (TRL KTOTrainer):   λ_D l (1 − σ(r)) + λ_U (1−l) σ(r)

    label_B in [0, 1] (1 good, 0 bad; soft labels allowed); ref per-token [B, T] or sums [B].
    Metrics (KTO's names): rewards/chosen and rewards/rejected are the mean r of good (l > 1/2) and of
    bad responses, logps/* their mean Σ log π, rewards/accuracies the share whose sign of r agrees with
    the label; token_rewards/* as for pairs when ref is per token.
    """
    if policy_BT.ndim != 2 or mask_BT.shape != policy_BT.shape:
        raise ValueError(
            f"outcome_loss: policy_BT and mask_BT must be [B, T] alike, got {policy_BT.shape}, "
            f"{mask_BT.shape}"
        )
    if label_B.shape != policy_BT.shape[:1]:
        raise ValueError(f"outcome_loss: label_B has shape {label_B.shape}, expected ({policy_BT.shape[0]},)")
    if loss_type not in UNPAIRED_TYPES:
        raise ValueError(f"outcome_loss: loss_type must be one of {UNPAIRED_TYPES}, got {loss_type!r}")
    LossConfig(beta=beta, loss_type=loss_type)  # its checks of β
    m_BT = mask_BT.astype(jnp.float32)
    B = policy_BT.shape[0]
    em_B = jnp.ones((B,), jnp.float32) if example_mask_B is None else example_mask_B.astype(jnp.float32)
    l_B = label_B.astype(jnp.float32)
    logp_B = tokenq.masked_sum(_f32(policy_BT), m_BT)
    r_B = beta * (logp_B - _ref_sum(ref, m_BT, "ref"))
    good_w_B, bad_w_B = desirable_weight * l_B, undesirable_weight * (1 - l_B)
    if loss_type == "outcome_ce":
        per_B = -(good_w_B * jax.nn.log_sigmoid(r_B) + bad_w_B * jax.nn.log_sigmoid(-r_B))
    else:
        per_B = good_w_B * (1 - jax.nn.sigmoid(r_B)) + bad_w_B * jax.nn.sigmoid(r_B)
    loss = _global_mean(per_B, em_B, axis_name)
    good_B = (l_B > 0.5).astype(jnp.float32)
    metrics = {"loss": loss}
    for name, w_B in (("chosen", em_B * good_B), ("rejected", em_B * (1 - good_B))):
        metrics[f"rewards/{name}"] = _global_mean(r_B, w_B, axis_name)
        metrics[f"logps/{name}"] = _global_mean(logp_B, w_B, axis_name)
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    agree_B = ((r_B > 0) == (l_B > 0.5)).astype(jnp.float32)
    metrics["rewards/accuracies"] = _global_mean(agree_B, em_B, axis_name)
    if ref.ndim == 2:
        r_BT = tokenq.implicit_rewards(policy_BT, ref, m_BT, beta)
        for name, w_B in (("chosen", em_B * good_B), ("rejected", em_B * (1 - good_B))):
            metrics[f"token_rewards/{name}_mean"] = _token_mean(r_BT, m_BT, w_B, axis_name)
    return loss, metrics


def sft_loss(
    logps_BT: Array,
    mask_BT: Array,
    *,
    pair_mask_B: Array | None = None,
    axis_name: str | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Negative log-likelihood per real token of the global batch -> (loss, {"loss", "nll", "tokens"})."""
    if logps_BT.ndim != 2:
        raise ValueError(f"sft_loss: logps_BT must be [B, T], got {logps_BT.shape}")
    m_BT = mask_BT.astype(jnp.float32)
    B = logps_BT.shape[0]
    pm_B = jnp.ones((B,), jnp.float32) if pair_mask_B is None else pair_mask_B.astype(jnp.float32)
    nll = _token_mean(-_f32(logps_BT), m_BT, pm_B, axis_name)
    tokens = _psum(jnp.sum(m_BT * pm_B[:, None]), axis_name)
    return nll, {"loss": nll, "nll": nll, "tokens": tokens}
