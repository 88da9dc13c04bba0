"""benchmarks/peers.py at a tiny shape: the files it writes, the agreement check, the timing protocol.

Every run of this file runs the dpoq part (the worker processes, the check of the dpoq layouts
against each other, interleaved steps, the results JSON). The peers' part (TRL 1.16 and Tunix 0.1.7
from their own virtualenvs) runs only when the environment variable DPOQ_PEERS_VENVS names a folder
that already holds those virtualenvs (as benchmarks/peers.py creates them: DIR/trl, DIR/tunix, each
with its dpoq_peers.json marker): creating them takes minutes of downloads, which a test does not
do. With the variable unset the peers' part is skipped; nothing else is.
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest

from benchmarks import peers

VENVS = os.environ.get("DPOQ_PEERS_VENVS", "")


def _have_venvs(root: str) -> bool:
    return bool(root) and all((pathlib.Path(root) / n / "dpoq_peers.json").is_file() for n in peers.PEERS)


def _run(tmp_path, monkeypatch, peer_list: str, cases: str) -> dict:
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("PYTHONPATH", str(pathlib.Path(peers.__file__).parent.parent))
    out = tmp_path / "peers.json"
    argv = ["--shape", "tiny", "--lengths", "short", "--pairs", "3", "--steps", "2", "--warmup", "1",
            "--peers", peer_list, "--cases", cases, "--out", str(out), "--workdir", str(tmp_path / "work")]
    if VENVS:
        argv += ["--venvs", VENVS]
    res = peers.main(argv)
    assert json.loads(out.read_text())["results"] == res["results"]
    assert out.with_suffix(".png").stat().st_size > 0
    return res


@pytest.mark.slow  # three JAX processes (check + two workers): about a minute on an idle 2-core machine
def test_dpoq_part(tmp_path, monkeypatch):
    res = _run(tmp_path, monkeypatch, "none", "padded,prefix_shared/bucketed")
    work = tmp_path / "work"
    spec = json.loads((work / "batch.json").read_text())
    assert len(spec["pairs"]) == 3 and all(p["chosen_ids"][-1] == 0 for p in spec["pairs"])
    # the reference differs from the policy, so the loss is not log 2
    loss = res["checks"]["dpoq"]["padded"]["loss"]
    assert abs(loss - np.log(2)) > 1e-3
    # the two layouts compute the same log-probs and loss
    (row,) = res["agreement"].values()
    assert max(row.values()) < 1e-5
    names = [r["case"] for r in res["results"]]
    assert names == ["dpoq padded", "dpoq prefix_shared/bucketed"]
    for r in res["results"]:
        assert len(r["step_times_s"]) == 2 and r["pairs_per_s"] > 0 and r["peak_rss_bytes"] > 0
    # bucketed prefix-shared rows: the smallest bucket that holds each pair's prompt + chosen + rejected
    need = max(len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in spec["pairs"])
    assert res["results"][1]["rows"][1] == min(b for b in spec["buckets"] if b >= need) <= spec["row_len"]


def test_agreement_flags_a_difference():
    a = {"logps_chosen": [-10.0, -20.0], "logps_rejected": [-5.0, -6.0], "loss": 0.7}
    b = dict(a, logps_chosen=[-10.0, -20.01])
    rows = peers.agreement({"dpoq": {"padded": a}, "trl": b})
    assert rows["dpoq padded vs trl"]["logps_chosen"] == pytest.approx(0.01 / 20.01)
    assert rows["dpoq padded vs trl"]["loss"] == 0.0


@pytest.mark.slow
@pytest.mark.skipif(not _have_venvs(VENVS), reason="DPOQ_PEERS_VENVS unset or without the trl/tunix venvs")
def test_peers_agree_with_dpoq(tmp_path, monkeypatch):
    res = _run(tmp_path, monkeypatch, "trl,tunix", "padded")
    worst = max(v for row in res["agreement"].values() for k, v in row.items() if not k.endswith("_abs"))
    assert worst <= peers.TOL
    assert {r["framework"] for r in res["results"]} == {"dpoq", "trl", "tunix"}
    assert res["results"][0]["ratio_vs_trl"] > 0
