"""Training loop: exact resume after a crash (and past an interrupted checkpoint write), the
non-finite stop with the last good checkpoint intact, precomputed == frozen reference."""

from __future__ import annotations

import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import loop_config, without_timing

from dpoq_jax.train.checkpoint import RunCheckpoints
from dpoq_jax.train.loop import NonFiniteError, train
from dpoq_jax.train.metrics import read_metrics
from dpoq_jax.train.setup import setup


def params_np(state):
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


class Crash(Exception):
    pass


def test_resume_after_crash_is_bitwise_exact(tmp_path, finished_run):
    """Crashed at step 4 (after the checkpoint of step 2 and the eval of step 3), resumed: the same
    parameters and metrics as the uninterrupted run (the module's finished run, same config)."""
    cfg, full_work, full_params, _ = finished_run

    def crash_at_4(step, batch):
        if step == 3:  # the batch of step 4
            raise Crash
        return batch

    work = str(tmp_path / "crashed")
    with pytest.raises(Crash):
        train(cfg, work, batch_hook=crash_at_4)
    ckpt_dir = os.path.join(work, "checkpoints")
    assert RunCheckpoints(ckpt_dir, every_steps=1, keep=3).all_steps() == [2]
    # a save cut short leaves only orbax's temporary directory: it must be ignored
    os.makedirs(os.path.join(ckpt_dir, "4.orbax-checkpoint-tmp-1234567", "params"))
    assert max(read_metrics(work), key=lambda r: r["step"])["step"] == 3
    resumed = train(cfg, work)  # from step 2: steps 3 (and its eval) run again, their rows replaced

    for a, b in zip(full_params, params_np(resumed.state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert without_timing(work) == without_timing(str(full_work))
    rows = read_metrics(work)
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if r["split"] == "eval"] == [3, 4]  # every 3 steps and the last
    with open(os.path.join(work, "config.json")) as f:
        assert json.load(f)["stage"] == "sft"
    assert os.listdir(os.path.join(work, "tb"))  # TensorBoard event file


def test_nonfinite_steps_are_skipped_then_stop_with_good_checkpoint(tmp_path):
    cfg = loop_config("sft", steps=8)
    cfg.checkpoint.every_steps = 1
    cfg.train.max_consecutive_nonfinite = 2

    def nan_batches(step, batch):
        if step == 1 or step >= 3:  # one isolated NaN batch, then NaNs for good
            batch = dict(batch, completion_mask=np.full_like(batch["completion_mask"], np.nan))
        return batch

    work = str(tmp_path / "nan")
    with pytest.raises(NonFiniteError, match="2 non-finite steps in a row"):
        train(cfg, work, batch_hook=nan_batches)
    rows = {r["step"]: r for r in read_metrics(work, "train")}
    assert rows[2]["finite"] == 0 and rows[2]["skipped"] == 1  # skipped, training went on
    assert rows[3]["finite"] == 1 and rows[3]["nonfinite_streak"] == 0
    assert rows[5]["nonfinite_streak"] == 2 and rows[5]["skipped"] == 3
    ckpts = RunCheckpoints(os.path.join(work, "checkpoints"), every_steps=1, keep=3)
    assert ckpts.latest_step() == 4  # the stop (step 5) wrote nothing
    run = setup(cfg, devices=jax.devices()[:1])
    s3, _ = ckpts.restore(3, run.abstract, run.shardings)
    s4, _ = ckpts.restore(4, run.abstract, run.shardings)
    for a, b in zip(params_np(s3), params_np(s4), strict=True):
        assert np.isfinite(b).all()
        np.testing.assert_array_equal(a, b)  # the skipped step 4 did not touch the parameters
    ckpts.close()


def test_relative_workdir_is_made_absolute(tmp_path, monkeypatch):
    """orbax refuses relative checkpoint paths; `dpoq train --workdir runs/x` must still work."""
    from dpoq_jax.train.checkpoint import RunCheckpoints

    monkeypatch.chdir(tmp_path)
    ckpts = RunCheckpoints("runs/x/checkpoints", every_steps=1, keep=1, async_save=False)
    assert ckpts.directory == str(tmp_path / "runs/x/checkpoints")
    assert ckpts.latest_step() is None


# ---- checkpoint integrity (issue 16): every damage kind, fallback to the newest intact step ------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A complete 4-step SFT run with checkpoints at steps 2 and 4, and its setup (for restores)."""
    cfg = loop_config("sft", steps=4)
    work = tmp_path_factory.mktemp("finished") / "w"
    result = train(cfg, str(work))
    return cfg, work, params_np(result.state), setup(cfg)


def _data_files(step_dir, item="params"):
    """The files that hold an item's array bytes (OCDBT `d/` files big enough for data, not index
    nodes); which `d/` directory holds them depends on the process and device layout."""
    files = [p for p in (step_dir / item).rglob("*") if p.is_file() and p.parent.name == "d"]
    big = [p for p in files if p.stat().st_size >= 4096]
    assert big, files
    return big


def _cut_half(step_dir):
    for f in _data_files(step_dir):
        os.truncate(f, f.stat().st_size // 2)


def _flip_64_bytes(step_dir):
    for f in _data_files(step_dir):
        b = bytearray(f.read_bytes())
        mid = len(b) // 2
        b[mid : mid + 64] = bytes(x ^ 0xFF for x in b[mid : mid + 64])
        f.write_bytes(bytes(b))


DAMAGE = {  # kind -> (damage step 4 in place, fragment of the one-line warning)
    "data_file_cut_in_half": (_cut_half, "item 'params' cannot be read"),
    "train_state_deleted": (lambda d: shutil.rmtree(d / "train_state"), "item 'train_state' cannot be read"),
    # OCDBT files here are zstd-compressed: a flip is a read error; on raw chunks (one device) orbax
    # reads flipped bytes without complaint and the checksum catches it, as with the swapped params
    "bytes_flipped_in_params": (_flip_64_bytes,
                                ("item 'params' cannot be read", "checksum mismatch in params[")),
    "params_of_another_step": (lambda d: (shutil.rmtree(d / "params"),
                                          shutil.copytree(d.parent / "2" / "params", d / "params")),
                               "checksum mismatch in params["),
    "loader_metadata_emptied": (lambda d: (d / "loader" / "metadata").write_text(""),
                                "item 'loader' cannot be read"),
    "integrity_record_deleted": (lambda d: shutil.rmtree(d / "integrity"), "no readable integrity record"),
    "loader_position_edited": (lambda d: (d / "loader" / "metadata").write_text('{"epoch": 0, "index": 0}'),
                               "loader position {'epoch': 0, 'index': 0} is malformed or differs"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_intact(tmp_path, finished_run, caplog, kind):
    cfg, work, _, run = finished_run
    copy = tmp_path / "w"
    shutil.copytree(work, copy)
    damage, fragment = DAMAGE[kind]
    damage(copy / "checkpoints" / "4")
    ckpts = RunCheckpoints(str(copy / "checkpoints"), every_steps=1, keep=3)
    with caplog.at_level(logging.WARNING, logger="dpoq_jax"):
        step, state, loader = ckpts.restore_latest_intact(run.abstract, run.shardings)
    ckpts.close()
    assert step == 2 and loader == {"epoch": 0, "index": 2 * cfg.train.batch_size}
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith(f"checkpoint {copy / 'checkpoints' / '4'} is damaged: ")
    assert any(f in warning for f in ((fragment,) if isinstance(fragment, str) else fragment)), warning
    assert warning.endswith("resuming from step 2") and "\n" not in warning
    assert sorted(os.listdir(copy / "checkpoints")) == ["2"]  # set aside, not deleted:
    assert os.listdir(copy / "checkpoints.damaged") == ["4"]
    assert int(state.step) == 2


def test_checkpoint_from_before_integrity_records_is_used_with_a_warning(tmp_path, finished_run, caplog):
    """A step whose orbax metadata lists no integrity item (written by an older version) is restored,
    checked for finiteness only; a deleted record of a step that had one is damage (above)."""
    cfg, work, _, run = finished_run
    copy = tmp_path / "w"
    shutil.copytree(work, copy)
    step4 = copy / "checkpoints" / "4"
    shutil.rmtree(step4 / "integrity")
    meta = json.loads((step4 / "_CHECKPOINT_METADATA").read_text())
    del meta["item_handlers"]["integrity"]
    (step4 / "_CHECKPOINT_METADATA").write_text(json.dumps(meta))
    ckpts = RunCheckpoints(str(copy / "checkpoints"), every_steps=1, keep=3)
    with caplog.at_level(logging.WARNING, logger="dpoq_jax"):
        step, _, _ = ckpts.restore_latest_intact(run.abstract, run.shardings)
    ckpts.close()
    assert step == 4 and "has no integrity record (written by an older dpoq_jax)" in caplog.text


def test_nonfinite_checkpoint_is_not_used(tmp_path, finished_run, caplog):
    """A step saved with NaN parameters has matching checksums but fails the finiteness check."""
    cfg, work, _, run = finished_run
    copy = tmp_path / "w"
    shutil.copytree(work, copy)
    ckpts = RunCheckpoints(str(copy / "checkpoints"), every_steps=1, keep=5, async_save=False)
    _, state, loader = ckpts.restore_latest_intact(run.abstract, run.shardings)
    bad = state.replace(params=jax.tree.map(lambda x: x * np.nan, state.params))
    ckpts.save(6, bad, loader=loader, config={}, model_config={}, force=True)
    ckpts.wait()
    with caplog.at_level(logging.WARNING, logger="dpoq_jax"):
        step, _, _ = ckpts.restore_latest_intact(run.abstract, run.shardings)
    ckpts.close()
    assert step == 4
    assert "is damaged: non-finite values in params[" in caplog.text


def test_no_intact_checkpoint_stops_with_one_line(tmp_path, finished_run):
    cfg, work, _, _ = finished_run
    copy = tmp_path / "w"
    shutil.copytree(work, copy)
    for step in ("2", "4"):
        (copy / "checkpoints" / step / "loader" / "metadata").write_text("")
    with pytest.raises(ValueError) as info:
        train(cfg, str(copy))
    msg = str(info.value)
    assert msg.startswith(f"{copy / 'checkpoints'}: no intact checkpoint (newest, step 4: item 'loader'")
    assert "2 damaged" in msg and "\n" not in msg
    assert sorted(os.listdir(copy / "checkpoints")) == ["2", "4"]  # nothing moved when nothing is usable


def test_resume_past_damage_and_torn_metrics_line_is_exact(tmp_path, finished_run, caplog):
    """Newest checkpoint's loader metadata emptied and metrics.jsonl torn mid-line (a crash): the
    rerun warns, resumes from step 2 and ends bit for bit where the undamaged run ended."""
    cfg, work, full_params, _ = finished_run
    copy = tmp_path / "w"
    shutil.copytree(work, copy)
    (copy / "checkpoints" / "4" / "loader" / "metadata").write_text("")
    with open(copy / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "split": "tra')
    with caplog.at_level(logging.WARNING, logger="dpoq_jax"):
        resumed = train(cfg, str(copy))
    assert f"{copy / 'metrics.jsonl'}:" in caplog.text and "dropping a torn last line" in caplog.text
    assert "is damaged: item 'loader' cannot be read" in caplog.text
    for a, b in zip(full_params, params_np(resumed.state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert without_timing(str(copy)) == without_timing(str(work))


def test_metrics_damage_other_than_a_torn_last_line_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "split": "train"}\n{"step": 2, "spl\n{"step": 3, "split": "train"}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a metrics line"):
        read_metrics(str(tmp_path))


def test_infinite_lr_never_reaches_a_checkpoint(tmp_path):
    """Finite gradients, infinite update: the guard sees the new parameters and skips the step, so
    every checkpoint holds the (finite) initial parameters and the run stops with NonFiniteError."""
    cfg = loop_config("sft", steps=4)
    cfg.optim.lr = float("inf")  # load_config refuses this; train() is called directly to test the guard
    cfg.checkpoint.every_steps = 1
    cfg.train.max_consecutive_nonfinite = 2
    work = str(tmp_path / "inf")
    with pytest.raises(NonFiniteError, match="2 non-finite steps in a row"):
        train(cfg, work)
    rows = read_metrics(work, "train")
    assert [(r["step"], r["finite"], r["skipped"]) for r in rows] == [(1, 0, 1), (2, 0, 2)]
    run = setup(cfg)
    ckpts = RunCheckpoints(os.path.join(work, "checkpoints"), every_steps=1, keep=3)
    step, state, _ = ckpts.restore_latest_intact(run.abstract, run.shardings)  # verified finite
    ckpts.close()
    assert step == 1
    for a, b in zip(params_np(run.new_state()), params_np(state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_checksums_do_not_depend_on_sharding_and_see_one_changed_element():
    from jax.sharding import NamedSharding, PartitionSpec

    from dpoq_jax.train.checkpoint import DamagedCheckpoint, array_checks, verify_arrays

    x = jnp.arange(8 * 6, dtype=jnp.float32).reshape(8, 6) / 7
    mesh = jax.make_mesh((8,), ("d",))
    sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("d", None)))
    tree = {"w": x, "b": jnp.ones(3, jnp.bfloat16), "n": jnp.int32(5)}
    one = array_checks(tree)
    assert array_checks({"w": sharded, "b": tree["b"], "n": tree["n"]}) == one
    record = {"arrays": {f"params{k}": [d, *s] for k, (d, s, _) in one.items()}}
    verify_arrays(record, "params", tree)
    for changed in (dict(tree, w=x.at[3, 2].add(1e-6)), dict(tree, w=x[::-1]), dict(tree, n=jnp.int32(6))):
        with pytest.raises(DamagedCheckpoint, match="checksum mismatch in params"):
            verify_arrays(record, "params", changed)


def test_commands_reading_a_run_skip_a_damaged_newest_step(tmp_path, finished_run, caplog):
    """`dpoq score/generate/convert --model WORKDIR`: a damaged newest step is named and the newest
    intact one is used (nothing moved: these commands only read); none intact: one clear line."""
    from flax import nnx

    from dpoq_jax.train.load import load_model

    def params_of(model):
        return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]

    _, work, final, _ = finished_run
    copy, only2 = tmp_path / "w", tmp_path / "only2"
    shutil.copytree(work, copy)
    shutil.copytree(work, only2)
    shutil.rmtree(only2 / "checkpoints" / "4")
    for a, b in zip(params_of(load_model(str(work))), final, strict=True):  # intact: the newest step
        np.testing.assert_array_equal(a, b)
    _cut_half(copy / "checkpoints" / "4")
    with caplog.at_level(logging.WARNING, logger="dpoq_jax"):
        model = load_model(str(copy))
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "checkpoint step 4" in warning and warning.endswith("using step 2"), warning
    assert (copy / "checkpoints" / "4").is_dir()  # read-only: not moved aside
    for a, b in zip(params_of(model), params_of(load_model(str(only2))), strict=True):
        np.testing.assert_array_equal(a, b)
    _cut_half(copy / "checkpoints" / "2")
    with pytest.raises(ValueError, match=r"^--model .*: no intact checkpoint under .* \(newest, step 4") as e:
        load_model(str(copy))
    assert "\n" not in str(e.value)
