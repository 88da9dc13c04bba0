"""Synthetic preference tasks with known per-token rewards and gold judges (offline, seeded).

Both tasks share one character-level vocabulary (`SyntheticTokenizer`, 42 ids):
  0 <pad>, 1 <bos>, 2 <eos>, 3..12 digits "0".."9", 13..38 letters "a".."z", 39 ":", 40 "=", 41 "|".

error_injection
  prompt "<bos>{rule}:{digits}=" with rule c (copy), s (sort ascending), a (add one to each digit,
  mod 10), r (reverse); chosen = the correct answer digits; rejected = chosen with k tokens replaced by
  a different digit at positions meta["error_positions"] (response token indices). Per-token gold
  reward: 0 for a token equal to the correct answer's token at that index (EOS included), -1 otherwise.
  Gold score = (number of correct tokens) / max(len(expected), len(response)), in [0, 1] (EOS counted
  in both lengths, so missing and extra tokens both lower it).
  Fluent errors (error_shift = k > 0): an injected digit is always (correct + k) mod 10, one fixed
  alternative per position; with sft_noise = q the SFT responses have each digit replaced by that
  alternative with probability q. With q = 0.5 a reference SFT'd on them finds the correct digit and
  its alternative equally likely: only the preference data tells them apart.

dense_reward
  prompt "<bos>{letters}=" (2-4 letters). Reference policy: a fixed random bigram model over the 16
  letters (logits ~ N(0, 1.5^2), previous token = the last letter shown) with a length rule: EOS is
  impossible before `min_len` response letters, has probability `eos_prob` after, and is forced after
  `max_len`. True per-token reward of letter a_t after previous letter s_t, at response index t:
      r(s_t, a_t) = W[s_t, a_t] + bonus              if t <  gold_len_limit
      r(s_t, a_t) = W[s_t, a_t] - length_penalty     if t >= gold_len_limit
  and 0 for EOS, with W ~ N(0, 0.5^2) (seeded). The gold judge is this reward summed. Preferences
  are Bradley–Terry on the summed reward (p(y1 > y2) = sigmoid(R(y1) - R(y2))) between two reference
  samples; with label_length_bias = λ the labeller judges R(y) + λ·len(y) instead (a known,
  tunable length bias; the gold judge is unchanged).
  With the defaults (min_len 3, eos_prob 0.2, gold_len_limit 16, length_penalty 2.5 >
  max W) the reference reaches 16 letters in about 4% of samples, so within the data longer is
  better (+bonus a letter), while the best achievable gold reward falls beyond 16 letters: a policy
  that extrapolates "longer is better" over-optimises.

arithmetic_chain
  prompt "<bos>{v0}{op}{x}:{n}=" (a start digit v0, an operation op x applied n = 3..6 times, op a = add,
  s = subtract, mod 10). The solution writes one step per application, "{k}{op}{x}={value}" (k = 1..n),
  steps joined by "|" (the step delimiter, step spec "|"), e.g. "<bos>5a3:3=" -> "1a3=8|2a3=1|3a3=4"; the
  last step's value is the final answer. Each step uses the previous step's value; both operations are
  bijections mod 10, so an error at step k (a wrong value) makes every later value, each consistently
  computed from the previous one, and the final answer wrong. SFT data has errors at known rates: a
  "hard" step (one that wraps around: v + x >= 10 or v - x < 0) gets the fluent wrong value
  (correct + 1) mod 10 with probability hard_error_rate, any other step a random wrong value with
  probability error_rate; later steps continue from the wrong value. With hard_error_rate > 0.5 the
  reference's likeliest value at a hard step is the wrong one, so neither its likelihood nor a majority
  vote finds the right answer reliably; only outcome labels can teach that. `check_solution` parses a
  response step by step: the first erroneous step (a step whose value is not the true one: wrong,
  malformed, missing or extra) and the final answer. (Everything a step needs sits at fixed places: the
  operation in the prompt, the previous value one step back, so a 2-layer decoder learns it.) The
  10 x 2 x 10 x 4 = 800 problems are split by problem (seeded): 65% train, 10% validation, 25% test.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Sequence

import numpy as np

from dpoq_jax.data.examples import PreferenceExample, SFTExample

SPECIALS = ("<pad>", "<bos>", "<eos>")
CHARS = "0123456789" + "abcdefghijklmnopqrstuvwxyz" + ":=|"
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
DIGIT0 = 3
LETTER0 = 13
N_LETTERS = 16  # the dense_reward task uses the letters a..p


class SyntheticTokenizer:
    """Character-level tokenizer with the methods the pipeline uses from a HF tokenizer."""

    pad_token_id = PAD_ID
    bos_token_id = BOS_ID
    eos_token_id = EOS_ID
    vocab_size = len(SPECIALS) + len(CHARS)

    def __init__(self):
        self._to_id = {c: i + len(SPECIALS) for i, c in enumerate(CHARS)}

    def get_vocab(self) -> dict[str, int]:
        """token -> id, as a HF tokenizer's get_vocab (specials first)."""
        return {**{sp: k for k, sp in enumerate(SPECIALS)}, **self._to_id}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Characters to ids; "<bos>", "<eos>", "<pad>" in the text become their special ids."""
        del add_special_tokens  # nothing is added implicitly, like add_special_tokens=False in HF
        ids, i = [], 0
        while i < len(text):
            for k, sp in enumerate(SPECIALS):
                if text.startswith(sp, i):
                    ids.append(k)
                    i += len(sp)
                    break
            else:
                c = text[i]
                if c not in self._to_id:
                    raise ValueError(f"character {c!r} at offset {i} is not in the synthetic vocabulary")
                ids.append(self._to_id[c])
                i += 1
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        out = []
        for t in ids:
            t = int(t)
            if t < len(SPECIALS):
                if not skip_special_tokens:
                    out.append(SPECIALS[t])
            elif t < self.vocab_size:
                out.append(CHARS[t - len(SPECIALS)])
            else:
                raise ValueError(f"token id {t} outside the synthetic vocabulary (size {self.vocab_size})")
        return "".join(out)

    def __len__(self) -> int:
        return self.vocab_size

    def save_pretrained(self, path: str) -> list[str]:
        """Write this tokenizer as Hugging Face tokenizer files (tokenizer.json: a word-level model over
        single characters, the three specials matched first, decoding without separators), so that
        AutoTokenizer.from_pretrained(path) and `dpoq --tokenizer PATH` give the same ids and text.
        One difference: a character outside the vocabulary is an error there too, but a plain Exception."""
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {s: i for i, s in enumerate(SPECIALS)} | self._to_id
        tk = Tokenizer(models.WordLevel(vocab, unk_token=None))
        tk.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")  # every character
        tk.decoder = decoders.Fuse()
        tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tk,
            pad_token=SPECIALS[PAD_ID],
            bos_token=SPECIALS[BOS_ID],
            eos_token=SPECIALS[EOS_ID],
        )
        written = [f for f in fast.save_pretrained(path) if os.path.isfile(f)]
        # transformers 5 writes its own class name; the generic one also loads with transformers 4.
        cfg_file = os.path.join(path, "tokenizer_config.json")
        with open(cfg_file) as f:
            cfg = json.load(f)
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        with open(cfg_file, "w") as f:
            json.dump(cfg, f, indent=2)
        return [os.path.basename(f) for f in written]


def _split_seed(seed: int, split: str) -> np.random.Generator:
    return np.random.default_rng([seed, {"train": 0, "validation": 1, "test": 2}[split]])


def _strip_eos(ids: Sequence[int]) -> list[int]:
    ids = [int(t) for t in ids]
    return ids[: ids.index(EOS_ID)] if EOS_ID in ids else ids


# --------------------------------------------------------------------------------------------
# error injection

RULES = {"c": "copy", "s": "sort", "a": "add1", "r": "reverse"}


def _apply_rule(rule: str, digits: str) -> str:
    if rule == "c":
        return digits
    if rule == "s":
        return "".join(sorted(digits))
    if rule == "a":
        return "".join(str((int(d) + 1) % 10) for d in digits)
    if rule == "r":
        return digits[::-1]
    raise ValueError(f"unknown rule {rule!r}; rules: {RULES}")


@dataclasses.dataclass(frozen=True)
class ErrorInjectionTask:
    """Rule-following digit strings; rejected = chosen with `n_errors` corrupted tokens."""

    seed: int = 0
    min_digits: int = 3
    max_digits: int = 8
    n_errors: tuple[int, ...] = (1, 2)  # number of corrupted tokens, drawn uniformly from these
    rules: str = "csar"
    error_shift: int = 0  # 0: an injected digit is a random other digit; k: always (correct + k) mod 10
    sft_noise: float = 0.0  # share of SFT digits replaced by their fluent alternative (needs error_shift)

    def __post_init__(self):
        if not 0 <= self.error_shift <= 9:
            raise ValueError(f"error_shift must be in 0..9, got {self.error_shift}")
        if not 0.0 <= self.sft_noise <= 1.0 or (self.sft_noise > 0 and self.error_shift == 0):
            raise ValueError(f"sft_noise must be in [0, 1] and needs error_shift > 0, got {self.sft_noise}")

    @property
    def tokenizer(self) -> SyntheticTokenizer:
        return SyntheticTokenizer()

    def preference_examples(self, n: int, split: str = "train") -> list[PreferenceExample]:
        rng = _split_seed(self.seed, split)
        out = []
        for i in range(n):
            rule = self.rules[rng.integers(len(self.rules))]
            n_digits = rng.integers(self.min_digits, self.max_digits + 1)
            digits = "".join(str(d) for d in rng.integers(0, 10, n_digits))
            chosen = _apply_rule(rule, digits)
            k = min(int(rng.choice(self.n_errors)), len(chosen))
            positions = sorted(int(x) for x in rng.choice(len(chosen), size=k, replace=False))
            rejected = list(chosen)
            for pos in positions:
                shift = int(rng.integers(1, 10))  # drawn also when fixed: the same pairs in every setting
                rejected[pos] = str((int(chosen[pos]) + (self.error_shift or shift)) % 10)  # never the same
            out.append(PreferenceExample(
                prompt=f"<bos>{rule}:{digits}=", chosen=chosen, rejected="".join(rejected),
                meta={"task": "error_injection", "split": split, "index": i, "rule": RULES[rule],
                      "error_positions": positions}))
        return out

    def sft_examples(self, n: int, split: str = "train") -> list[SFTExample]:
        """The chosen (correct) responses of the same prompts as `preference_examples(n, split)`; with
        sft_noise, each digit replaced by its fluent alternative with that probability."""
        pairs = self.preference_examples(n, split)
        if self.sft_noise == 0:
            return [SFTExample(e.prompt, e.chosen, dict(e.meta)) for e in pairs]
        rng = np.random.default_rng([self.seed, 7, {"train": 0, "validation": 1, "test": 2}[split]])
        out = []
        for e in pairs:
            flip = rng.random(len(e.chosen)) < self.sft_noise
            text = "".join(
                str((int(c) + self.error_shift) % 10) if f else c for c, f in zip(e.chosen, flip, strict=True)
            )
            flipped = [int(i) for i in np.flatnonzero(flip)]
            out.append(SFTExample(e.prompt, text, dict(e.meta, sft_flipped=flipped)))
        return out

    def expected_ids(self, prompt: str) -> list[int]:
        """Correct response ids for a prompt, EOS included."""
        body = prompt.removeprefix("<bos>")
        if len(body) < 3 or body[1] != ":" or not body.endswith("="):
            raise ValueError(f"not an error_injection prompt: {prompt!r}")
        answer = _apply_rule(body[0], body[2:-1])
        return SyntheticTokenizer().encode(answer) + [EOS_ID]

    def gold_token_rewards(self, prompt: str, response_ids: Sequence[int]) -> np.ndarray:
        """0 where the token equals the correct answer's token at that index, -1 elsewhere."""
        exp = self.expected_ids(prompt)
        resp = [int(t) for t in response_ids]
        return np.array([0.0 if t < len(exp) and r == exp[t] else -1.0 for t, r in enumerate(resp)])

    def gold_score(self, prompt: str, response_ids: Sequence[int]) -> float:
        """Fraction correct: (correct tokens) / max(len(expected), len(response)), EOS included."""
        exp = self.expected_ids(prompt)
        resp = [int(t) for t in response_ids]
        n_correct = int(np.sum(self.gold_token_rewards(prompt, resp) == 0))
        return n_correct / max(len(exp), len(resp))


# --------------------------------------------------------------------------------------------
# dense reward


@functools.lru_cache(maxsize=16)
def _dense_tables(seed: int, policy_scale: float, reward_scale: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 12345])
    logits = rng.normal(0.0, policy_scale, (N_LETTERS, N_LETTERS))
    W = rng.normal(0.0, reward_scale, (N_LETTERS, N_LETTERS))
    logits.flags.writeable = W.flags.writeable = False  # shared through the cache
    return logits, W


@dataclasses.dataclass(frozen=True)
class DenseRewardTask:
    """Reference-policy samples labelled by Bradley–Terry on a known dense per-token reward."""

    seed: int = 0
    min_len: int = 3
    eos_prob: float = 0.2
    max_len: int = 32
    gold_len_limit: int = 16
    bonus: float = 0.3
    length_penalty: float = 2.5
    policy_scale: float = 1.5
    reward_scale: float = 0.5
    label_length_bias: float = 0.0  # λ: the labeller prefers by R(y) + λ·len(y); gold_score stays R(y)

    @property
    def tokenizer(self) -> SyntheticTokenizer:
        return SyntheticTokenizer()

    def _tables(self) -> tuple[np.ndarray, np.ndarray]:
        """(reference bigram logits, reward table W), both [16, 16] over letters."""
        return _dense_tables(self.seed, self.policy_scale, self.reward_scale)

    def reference_next_probs(self, prev_letter: int, t: int) -> np.ndarray:
        """Reference policy's next-token distribution over the full vocabulary at response index t."""
        logits, _ = self._tables()
        probs = np.zeros(SyntheticTokenizer.vocab_size)
        p_eos = 0.0 if t < self.min_len else (1.0 if t >= self.max_len else self.eos_prob)
        z = np.exp(logits[prev_letter] - logits[prev_letter].max())
        probs[LETTER0 : LETTER0 + N_LETTERS] = (1.0 - p_eos) * z / z.sum()
        probs[EOS_ID] = p_eos
        return probs

    def _prev_letter(self, prompt: str) -> int:
        body = prompt.removeprefix("<bos>")
        if len(body) < 2 or not body.endswith("=") or any(c not in CHARS[10:26] for c in body[:-1]):
            raise ValueError(f"not a dense_reward prompt: {prompt!r}")
        return CHARS.index(body[-2]) - 10

    def sample_reference(self, prompt: str, rng: np.random.Generator) -> list[int]:
        """One response from the reference policy: letter ids then EOS."""
        prev, ids = self._prev_letter(prompt), []
        for t in range(self.max_len + 1):
            tok = int(rng.choice(SyntheticTokenizer.vocab_size, p=self.reference_next_probs(prev, t)))
            ids.append(tok)
            if tok == EOS_ID:
                break
            prev = tok - LETTER0
        return ids

    def gold_token_rewards(self, prompt: str, response_ids: Sequence[int]) -> np.ndarray:
        """r(s_t, a_t) for every response token (see the module docstring); 0 for EOS and after it.

        Tokens that are not letters (digits, symbols, specials other than EOS) get -length_penalty - 1.
        """
        _, W = self._tables()
        prev, out, done = self._prev_letter(prompt), [], False
        for t, tok in enumerate(int(x) for x in response_ids):
            if done or tok == EOS_ID:
                out.append(0.0)
                done = True
                continue
            if not LETTER0 <= tok < LETTER0 + N_LETTERS:
                out.append(-self.length_penalty - 1.0)
                continue
            a = tok - LETTER0
            extra = self.bonus if t < self.gold_len_limit else -self.length_penalty
            out.append(float(W[prev, a]) + extra)
            prev = a
        return np.array(out)

    def gold_score(self, prompt: str, response_ids: Sequence[int]) -> float:
        return float(self.gold_token_rewards(prompt, response_ids).sum())

    def _prompt(self, rng: np.random.Generator) -> str:
        letters = "".join(CHARS[10 + int(k)] for k in rng.integers(0, N_LETTERS, rng.integers(2, 5)))
        return f"<bos>{letters}="

    def preference_examples(self, n: int, split: str = "train") -> list[PreferenceExample]:
        rng = _split_seed(self.seed, split)
        tok = SyntheticTokenizer()
        out = []
        for i in range(n):
            prompt = self._prompt(rng)
            y1, y2 = self.sample_reference(prompt, rng), self.sample_reference(prompt, rng)
            r1, r2 = self.gold_score(prompt, y1), self.gold_score(prompt, y2)
            bias = self.label_length_bias * (len(_strip_eos(y1)) - len(_strip_eos(y2)))
            first_wins = rng.random() < 1.0 / (1.0 + np.exp(-(r1 - r2 + bias)))
            (c, rc), (rj, rr) = ((y1, r1), (y2, r2)) if first_wins else ((y2, r2), (y1, r1))
            out.append(PreferenceExample(
                prompt=prompt, chosen=tok.decode(_strip_eos(c)), rejected=tok.decode(_strip_eos(rj)),
                meta={"task": "dense_reward", "split": split, "index": i,
                      "chosen_reward": rc, "rejected_reward": rr}))
        return out

    def sft_examples(self, n: int, split: str = "train", responses: str = "all") -> list[SFTExample]:
        """SFT data for the reference: "all" responses (2 per pair) or only the "chosen" ones."""
        if responses not in ("all", "chosen"):
            raise ValueError(f"responses must be 'all' or 'chosen', got {responses!r}")
        out = []
        for e in self.preference_examples(n, split):
            out.append(SFTExample(e.prompt, e.chosen, dict(e.meta)))
            if responses == "all":
                out.append(SFTExample(e.prompt, e.rejected, dict(e.meta)))
        return out


# --------------------------------------------------------------------------------------------
# arithmetic chain (implicit process rewards: steps whose correctness is known exactly)

CHAIN_OPS = {"a": "add", "s": "subtract"}
STEP_DELIMITER = "|"  # the step spec of dpoq_jax.analysis.text_steps for this task
_STEP_RE = re.compile(r"^([1-9])([as])([0-9])=([0-9])\|?$")


def _chain_apply(op: str, value: int, x: int) -> int:
    return (value + x) % 10 if op == "a" else (value - x) % 10


def _chain_hard(op: str, value: int, x: int) -> bool:
    """A step that wraps around mod 10 (a carry or a borrow): where the reference errs most."""
    return value + x >= 10 if op == "a" else value - x < 0


def split_steps(text: str) -> list[str]:
    """The steps of a solution text, each with the "|" that ends it (as analysis.text_steps cuts "|")."""
    return [m for m in re.findall(r"[^|]*\|?", text) if m]


CHAIN_SPLITS = {"train": 0.65, "validation": 0.10, "test": 0.25}


@functools.lru_cache(maxsize=16)
def _chain_problems(seed: int, min_steps: int, max_steps: int) -> dict[str, list[tuple[int, str, int, int]]]:
    every = [(v0, op, x, n) for v0 in range(10) for op in "as" for x in range(10)
             for n in range(min_steps, max_steps + 1)]  # fmt: skip
    order = np.random.default_rng([seed, 2525]).permutation(len(every))
    a = round(CHAIN_SPLITS["train"] * len(every))
    b = a + round(CHAIN_SPLITS["validation"] * len(every))
    cut = {"train": order[:a], "validation": order[a:b], "test": order[b:]}
    return {k: [every[int(i)] for i in v] for k, v in cut.items()}


@dataclasses.dataclass(frozen=True)
class ChainCheck:
    """A solution checked step by step. first_error: index of the first step whose value is not the true
    one, or that is malformed, extra, or the last of too few (None: no error); step_errors: per written
    step, whether it is wrong given the previous written value (a local error); answer: the final answer
    (the last step's value; None if that step is malformed or the number of steps is wrong); correct:
    the answer equals the true one (as a final-answer label, it can be right despite a wrong step)."""

    first_error: int | None
    step_errors: list[bool]
    answer: int | None
    correct: bool
    n_steps: int  # steps the problem needs


@dataclasses.dataclass(frozen=True)
class ArithmeticChainTask:
    """A chain of mod-10 additions or subtractions, one step per line ("|"), errors at known rates."""

    seed: int = 0
    min_steps: int = 3
    max_steps: int = 6
    error_rate: float = 0.05  # SFT data: a non-wrapping step gets a random wrong value
    hard_error_rate: float = 0.6  # SFT data: a wrapping step gets (correct + 1) mod 10

    def __post_init__(self):
        if not 1 <= self.min_steps <= self.max_steps <= 9:
            raise ValueError(f"need 1 <= min_steps <= max_steps <= 9, got {self.min_steps}, {self.max_steps}")
        for name in ("error_rate", "hard_error_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    @property
    def tokenizer(self) -> SyntheticTokenizer:
        return SyntheticTokenizer()

    @property
    def max_response_tokens(self) -> int:
        """Tokens of the longest correct solution, EOS included (6 a step, no "|" after the last)."""
        return 6 * self.max_steps

    def problems(self, split: str) -> list[tuple[int, str, int, int]]:
        """The distinct problems (v0, op, x, n) of a split: all of them shuffled by the seed and cut
        65% / 10% / 25% into train / validation / test, so held-out problems are never trained on."""
        return _chain_problems(self.seed, self.min_steps, self.max_steps)[split]

    def _problem(self, rng: np.random.Generator, split: str) -> tuple[int, str, int, int]:
        pool = self.problems(split)
        return pool[int(rng.integers(len(pool)))]

    @staticmethod
    def prompt_text(v0: int, op: str, x: int, n: int) -> str:
        return f"<bos>{v0}{op}{x}:{n}="

    @staticmethod
    def parse_prompt(prompt: str) -> tuple[int, str, int, int]:
        m = re.fullmatch(r"(?:<bos>)?([0-9])([as])([0-9]):([1-9])=", prompt)
        if not m:
            raise ValueError(f"not an arithmetic_chain prompt: {prompt!r}")
        return int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))

    @staticmethod
    def values(v0: int, op: str, x: int, n: int) -> list[int]:
        """The true value after each step."""
        out, v = [], v0
        for _ in range(n):
            v = _chain_apply(op, v, x)
            out.append(v)
        return out

    @staticmethod
    def solution_text(op: str, x: int, values: Sequence[int]) -> str:
        return STEP_DELIMITER.join(f"{k + 1}{op}{x}={v}" for k, v in enumerate(values))

    def with_error(self, v0: int, op: str, x: int, n: int, k: int, wrong: int) -> list[int]:
        """Values of a solution whose step k gets the value `wrong` (≠ the true one), every later step
        computed correctly from it (so the final answer is wrong too)."""
        vals = self.values(v0, op, x, n)
        if wrong == vals[k]:
            raise ValueError(f"step {k}: {wrong} is the true value")
        out, v = vals[:k] + [wrong], wrong
        for _ in range(k + 1, n):
            v = _chain_apply(op, v, x)
            out.append(v)
        return out

    def noisy_values(self, v0: int, op: str, x: int, n: int, rng: np.random.Generator
                     ) -> tuple[list[int], list[int]]:
        """(values, indices of the locally wrong steps) as the SFT data writes them: each step errs with
        its rate (hard_error_rate at a wrapping step, else error_rate), given the value written before."""
        out, errs, v = [], [], v0
        for k in range(n):
            right = _chain_apply(op, v, x)
            u, d = rng.random(), int(rng.integers(1, 10))  # both drawn always: same problems at any rate
            if _chain_hard(op, v, x):
                new = (right + 1) % 10 if u < self.hard_error_rate else right
            else:
                new = (right + d) % 10 if u < self.error_rate else right
            if new != right:
                errs.append(k)
            out.append(new)
            v = new
        return out, errs

    def sft_examples(self, n: int, split: str = "train") -> list[SFTExample]:
        """Solutions with errors at the known rates (meta: error_steps, hard_steps, first_error, correct)."""
        rng = _split_seed(self.seed, split)
        out = []
        for i in range(n):
            v0, op, x, k = self._problem(rng, split)
            vals, errs = self.noisy_values(v0, op, x, k, rng)
            prev = [v0, *vals[:-1]]
            hard = [j for j in range(k) if _chain_hard(op, prev[j], x)]
            out.append(SFTExample(
                self.prompt_text(v0, op, x, k), self.solution_text(op, x, vals),
                {"task": "arithmetic_chain", "split": split, "index": i, "error_steps": errs,
                 "hard_steps": hard, "first_error": errs[0] if errs else None,
                 "correct": vals[-1] == self.values(v0, op, x, k)[-1]}))
        return out

    def preference_examples(self, n: int, split: str = "train") -> list[PreferenceExample]:
        """The true solution vs the same with an error at a random step k (meta: first_error = k)."""
        rng = _split_seed(self.seed, split)
        out = []
        for i in range(n):
            v0, op, x, m = self._problem(rng, split)
            k = int(rng.integers(m))
            right = self.values(v0, op, x, m)
            rej = self.with_error(v0, op, x, m, k, (right[k] + int(rng.integers(1, 10))) % 10)
            out.append(PreferenceExample(
                self.prompt_text(v0, op, x, m), self.solution_text(op, x, right),
                self.solution_text(op, x, rej),
                {"task": "arithmetic_chain", "split": split, "index": i, "first_error": k}))
        return out

    def prompts(self, n: int, split: str = "test") -> list[str]:
        """n prompts of a split: its distinct problems in their shuffled order, repeated in turn when n
        is larger than their number (train 520, validation 80, test 200 with 3-6 steps)."""
        pool = self.problems(split)
        return [self.prompt_text(*pool[i % len(pool)]) for i in range(n)]

    def check_steps(self, prompt: str, steps: Sequence[str]) -> ChainCheck:
        """Check written steps (texts as `split_steps` gives them; a "<eos>" in them is ignored)."""
        v0, op, x, n = self.parse_prompt(prompt)
        truth = self.values(v0, op, x, n)
        step_errors, first, v = [], None, v0
        for k, text in enumerate(steps):
            m = _STEP_RE.match(text.replace("<eos>", ""))
            ok = m is not None and k < n and (int(m.group(1)), m.group(2), int(m.group(3))) == (k + 1, op, x)
            value = int(m.group(4)) if ok else None
            step_errors.append(value is None or v is None or value != _chain_apply(op, v, x))
            if first is None and (value is None or value != truth[k]):
                first = k
            v = value
        answer = v if len(steps) == n else None
        if first is None and answer is None:  # too few steps, all right: the last one is a wrong answer
            first = max(len(steps) - 1, 0)
        return ChainCheck(first, step_errors, answer, answer is not None and answer == truth[-1], n)

    def check_solution(self, prompt: str, text: str) -> ChainCheck:
        """Check a solution text (the response, EOS stripped or written as "<eos>")."""
        return self.check_steps(prompt, split_steps(text.replace("<eos>", "")))

    def gold_score(self, prompt: str, response_ids: Sequence[int]) -> float:
        """1.0 if the final answer is right, else 0.0."""
        text = SyntheticTokenizer().decode(_strip_eos(response_ids))
        return float(self.check_solution(prompt, text).correct)


TASKS = {"error_injection": ErrorInjectionTask, "dense_reward": DenseRewardTask,
         "arithmetic_chain": ArithmeticChainTask}


def make_task(name: str, **kwargs) -> ErrorInjectionTask | DenseRewardTask | ArithmeticChainTask:
    if name not in TASKS:
        raise ValueError(f"unknown synthetic task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name](**kwargs)


# Exact soft-optimal values of the dense_reward task: its reference and reward depend only on the
# previous letter and the response index, so V*(s) is a table over (letter, index).


def dense_optimal_values(task: DenseRewardTask, beta: float) -> np.ndarray:
    """V*(prev letter, t) for t = 0..max_len+1 by backward induction (paper §2, soft Bellman),
    float64 [16, max_len+2].

    V*(s) = β log Σ_a π_ref(a|s) exp((r(s,a) + V*(s a))/β), with EOS terminal (reward 0, V = 0).
    """
    _, W = task._tables()
    n, T = N_LETTERS, task.max_len
    V = np.zeros((n, T + 2))
    for t in range(T, -1, -1):
        extra = task.bonus if t < task.gold_len_limit else -task.length_penalty
        for prev in range(n):
            p = task.reference_next_probs(prev, t)
            p_letters = p[LETTER0 : LETTER0 + n]
            terms = [np.log(p[EOS_ID]) if p[EOS_ID] > 0 else -np.inf]
            with np.errstate(divide="ignore"):
                terms += list(np.log(p_letters) + (W[prev] + extra + V[:, t + 1]) / beta)
            V[prev, t] = beta * np.logaddexp.reduce(np.array(terms))
    return V


def dense_shaping(
    task: DenseRewardTask, prompt: str, response_ids: Sequence[int], V: np.ndarray
) -> np.ndarray:
    """Per-token shaping V*(s_{t+1}) − V*(s_t) along a response (EOS leads to the terminal V = 0).

    The optimal implicit reward is β log π*/π_ref = r(s_t,a_t) + V*(s_{t+1}) − V*(s_t) (Eq. 10).
    """
    prev = task._prev_letter(prompt)
    out = []
    for t, tok in enumerate(int(x) for x in response_ids):
        v_now = V[prev, t]
        if tok == EOS_ID:
            out.append(-v_now)
            break
        if not LETTER0 <= tok < LETTER0 + N_LETTERS:
            raise ValueError(f"dense_shaping: token {tok} at response index {t} is not a letter or EOS")
        prev = tok - LETTER0
        out.append(V[prev, t + 1] - v_now)
    return np.array(out)
