"""The paper's theory, checked exactly on a tiny token tree (vocabulary 3 with EOS, horizon 3).

States are prefixes; token 2 is EOS; a state of length H−1 terminates whatever the action. We draw a
dense reward r(s, a) and a reference policy, solve the KL-regularised problem by backward induction
(soft value iteration) in float64, and check the paper's identities through dpoq_jax's functions.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpoq_jax import losses, tokenq

VOCAB, EOS, H, BETA = 3, 2, 3, 0.5


def _tree(seed=0):
    rng = np.random.default_rng(seed)
    states = [()]  # non-terminal prefixes, breadth first
    for s in states:
        if len(s) < H - 1:
            states += [s + (a,) for a in range(VOCAB) if a != EOS]
    idx = {s: i for i, s in enumerate(states)}
    reward = rng.normal(size=(len(states), VOCAB))
    ref_logits = rng.normal(size=(len(states), VOCAB))
    ref_logp = ref_logits - np.log(np.exp(ref_logits).sum(-1, keepdims=True))

    def child(s, a):  # index of the next state, or None if (s, a) ends the episode
        return None if a == EOS or len(s) + 1 >= H else idx[s + (a,)]

    # Backward induction: Q* = r + β log π_ref + V*(s'), V* = β logsumexp(Q*/β), V* = 0 at the end.
    q = np.zeros_like(reward)
    v = np.zeros(len(states))
    for s in sorted(states, key=len, reverse=True):
        i = idx[s]
        for a in range(VOCAB):
            c = child(s, a)
            q[i, a] = reward[i, a] + BETA * ref_logp[i, a] + (0.0 if c is None else v[c])
        v[i] = BETA * np.log(np.exp(q[i] / BETA).sum())
    v_next = np.array(
        [[0.0 if child(s, a) is None else v[child(s, a)] for a in range(VOCAB)] for s in states]
    )

    # Complete sequences, padded to H, with the state index of each position.
    seqs = []
    for n in range(1, H + 1):
        for toks in itertools.product(range(VOCAB), repeat=n):
            ends_early = toks[-1] == EOS
            if all(a != EOS for a in toks[:-1]) and (ends_early or n == H):
                seqs.append(toks)
    tokens = np.zeros((len(seqs), H), np.int32)
    state_ids = np.zeros((len(seqs), H), np.int32)
    mask = np.zeros((len(seqs), H), np.float32)
    for b, toks in enumerate(seqs):
        tokens[b, : len(toks)] = toks
        state_ids[b, : len(toks)] = [idx[toks[:t]] for t in range(len(toks))]
        mask[b, : len(toks)] = 1
    seq_reward = (reward[state_ids, tokens] * mask).sum(1)
    return dict(states=states, reward=reward, ref_logp=ref_logp, q=q, v=v, v_next=v_next, tokens=tokens,
                state_ids=state_ids, mask=mask, seq_reward=seq_reward)  # fmt: skip


@pytest.fixture(scope="module")
def tree():
    return _tree()


def _seq_logps(table_SV, tr):
    """Per-token log-probs of every complete sequence under a tabular policy with logits table_SV."""
    return tokenq.token_logps(table_SV[tr["state_ids"]], tr["tokens"], tr["mask"])


def test_soft_value_iteration_matches_enumeration(tree):
    # π*(τ) ∝ π_ref(τ) exp(R(τ)/β) and V*(s_0) = β log Σ_τ π_ref(τ) exp(R(τ)/β): independent of the recursion.
    logp_star = np.asarray(_seq_logps(tree["q"] / BETA, tree), np.float64).sum(1)
    logp_ref = np.asarray(_seq_logps(tree["ref_logp"], tree), np.float64).sum(1)
    log_z = np.log(np.sum(np.exp(logp_ref + tree["seq_reward"] / BETA)))
    np.testing.assert_allclose(logp_star, logp_ref + tree["seq_reward"] / BETA - log_z, atol=1e-5)
    np.testing.assert_allclose(tree["v"][0], BETA * log_z, atol=1e-6)
    np.testing.assert_allclose(np.exp(logp_star).sum(), 1.0, atol=1e-5)


def test_eq10_implicit_reward_is_shaped_reward(tree):
    # Q* used as logits (Q = β·logits): β log π*/π_ref = r + V*(s') − V*(s) at every state and action.
    logp_star = np.asarray(jax.nn.log_softmax(tree["q"] / BETA), np.float64)
    lhs = BETA * (logp_star - tree["ref_logp"])
    np.testing.assert_allclose(lhs, tree["reward"] + tree["v_next"] - tree["v"][:, None], atol=1e-5)
    # Adding any per-state shift to the logits changes nothing.
    shifted = tree["q"] / BETA + np.random.default_rng(1).normal(size=(len(tree["states"]), 1)) * 5
    np.testing.assert_allclose(tokenq.advantages(shifted, BETA), BETA * logp_star, atol=1e-5)
    # V = β·logsumexp(logits) recovers V* exactly when the logits are Q*/β.
    np.testing.assert_allclose(tokenq.implicit_v(tree["q"] / BETA, BETA), tree["v"], atol=1e-5)


def test_bellman_inversion_recovers_reward(tree):
    # Lemma 1: r = Q*(s,a) − β log π_ref(a|s) − V*(s'), V* = 0 after EOS, through tokenq.bellman_rewards.
    logits = (tree["q"] / BETA)[tree["state_ids"]]
    ref_lp = _seq_logps(tree["ref_logp"], tree)
    r = tokenq.bellman_rewards(logits, tree["tokens"], ref_lp, tree["mask"], BETA)
    np.testing.assert_allclose(r, tree["reward"][tree["state_ids"], tree["tokens"]] * tree["mask"], atol=1e-5)


def test_telescoping_and_dpo_equals_bradley_terry(tree):
    lp = _seq_logps(tree["q"] / BETA, tree)
    ref_lp = _seq_logps(tree["ref_logp"], tree)
    summed = tokenq.masked_sum(tokenq.implicit_rewards(lp, ref_lp, tree["mask"], BETA), tree["mask"])
    # Σ_t β log π*/π_ref = Σ_t r − V*(s_0) for every complete sequence.
    np.testing.assert_allclose(summed, tree["seq_reward"] - tree["v"][0], atol=1e-5)

    # DPO's implied preference exp(−loss) = σ(β Δ log-ratio) equals Bradley–Terry on the true summed reward.
    n = len(tree["tokens"])
    i, j = np.array([(a, b) for a in range(n) for b in range(n) if a != b]).T
    m = tree["mask"]
    cfg = losses.LossConfig(beta=BETA, loss_type="sigmoid")

    def one_pair(pc, pr, rc, rr, cm, rm):
        return losses.preference_loss(pc[None], pr[None], rc[None], rr[None], cm[None], rm[None], config=cfg)[
            0
        ]

    pair_loss = jax.jit(jax.vmap(one_pair))(lp[i], lp[j], ref_lp[i], ref_lp[j], m[i], m[j])
    bt = 1 / (1 + np.exp(-(tree["seq_reward"][i] - tree["seq_reward"][j])))
    np.testing.assert_allclose(np.exp(-np.asarray(pair_loss, np.float64)), bt, atol=1e-5)


def test_kl_identity_on_tree(tree):
    # §5.4: E_{a~π_ref}[β log π*/π_ref] = −β KL(π_ref ‖ π*) ≤ 0, < 0 where π* ≠ π_ref.
    e = np.asarray(tokenq.expected_ref_reward(tree["q"] / BETA, tree["ref_logp"], BETA))
    p_ref = np.exp(tree["ref_logp"])
    logp_star = tree["q"] / BETA - np.log(np.exp(tree["q"] / BETA).sum(-1, keepdims=True))
    np.testing.assert_allclose(e, -BETA * (p_ref * (tree["ref_logp"] - logp_star)).sum(-1), atol=1e-5)
    assert np.all(e < 0)


def fit_tabular_dpo(tree, steps=3000, lr=0.05):
    """Theorem 1 in action: minimise the exact expected DPO loss over a tabular policy.

    Pairs are all ordered pairs of distinct complete sequences, labelled by Bradley–Terry on the true
    dense reward: (i ≻ j) has weight σ(R_i − R_j), passed as pair_mask_B (the loss is a weighted mean).
    Returns the learned per-token implicit reward table β log π_θ/π_ref and the final loss.
    """
    n = len(tree["tokens"])
    i, j = np.array([(a, b) for a in range(n) for b in range(n) if a != b]).T
    w = 1 / (1 + np.exp(-(tree["seq_reward"][i] - tree["seq_reward"][j])))
    m = tree["mask"]
    ref_lp = _seq_logps(tree["ref_logp"], tree)
    cfg = losses.LossConfig(beta=BETA, loss_type="sigmoid")

    def loss_fn(theta):
        lp = _seq_logps(theta, tree)
        return losses.preference_loss(
            lp[i], lp[j], ref_lp[i], ref_lp[j], m[i], m[j], config=cfg, pair_mask_B=w
        )[0]

    opt = optax.adam(lr)
    theta0 = jnp.asarray(tree["ref_logp"], jnp.float32)  # start at π = π_ref

    def step(carry, _):
        theta, state = carry
        loss, g = jax.value_and_grad(loss_fn)(theta)
        upd, state = opt.update(g, state)
        return (optax.apply_updates(theta, upd), state), loss

    (theta, _), loss_trace = jax.jit(functools.partial(jax.lax.scan, step, length=steps))(
        (theta0, opt.init(theta0))
    )
    learned = BETA * (np.asarray(jax.nn.log_softmax(theta), np.float64) - tree["ref_logp"])
    return learned, np.asarray(loss_trace)


def test_theorem1_dpo_recovers_dense_reward_up_to_shaping(tree):
    learned, loss_trace = fit_tabular_dpo(tree)
    shaped = tree["reward"] + tree["v_next"] - tree["v"][:, None]  # r + V*(s') − V*(s)
    err_shaped = np.abs(learned - shaped).max()
    err_raw = np.abs(learned - tree["reward"]).max()
    print(f"Theorem 1 fit: max |r_hat - (r + V*(s') - V*(s))| = {err_shaped:.2e}; ", end="")
    print(f"max |r_hat - r| = {err_raw:.2f}")
    assert loss_trace[-1] < loss_trace[0]
    assert err_shaped < 1e-3, err_shaped
    assert err_raw > 0.1  # the shaping term is real: the raw reward is not what DPO recovers
    # After removing the shaping term the learned reward is the true one at every state and token.
    unshaped = learned - tree["v_next"] + tree["v"][:, None]
    np.testing.assert_allclose(unshaped, tree["reward"], atol=1e-3)
