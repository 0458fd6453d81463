"""The run-directory contract: complete checkpoints are kept, partial ones are cleaned up."""

import os

from halos_core.run_dir import TMP_PREFIX, RunDir, read_manifest, write_manifest


def _complete(path, step, payload=b"w"):
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(payload * 10)
    write_manifest(path, step=step, examples=step * 8)
    return path


def test_clean_keeps_complete_and_removes_partial(tmp_path):
    rd = RunDir(tmp_path / "run").create()
    _complete(rd.checkpoint_path(2), 2)
    half = rd.checkpoint_path(4)
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")  # no meta.json
    tmp = rd.checkpoints / f"{TMP_PREFIX}step-000006"
    tmp.mkdir()
    removed = rd.clean_partial_checkpoints()
    assert sorted(p.name for p in removed) == sorted([half.name, tmp.name])
    assert [m.step for m in rd.complete_checkpoints()] == [2]


def test_a_kill_between_the_two_renames_of_a_resave_loses_nothing(tmp_path):
    # Re-saving step 4: the old copy went aside, the new one is complete under its temp name,
    # and the final rename never happened.
    rd = RunDir(tmp_path / "run").create()
    _complete(rd.checkpoint_path(2), 2)
    _complete(rd.checkpoints / f"{TMP_PREFIX}old-step-000004", 4, payload=b"o")
    _complete(rd.checkpoints / f"{TMP_PREFIX}step-000004", 4, payload=b"n")
    rd.clean_partial_checkpoints()
    latest = rd.latest_checkpoint()
    assert latest.step == 4
    assert (latest.path / "model.safetensors").read_bytes() == b"n" * 10  # the newer copy wins
    assert not any(p.name.startswith(TMP_PREFIX) for p in rd.checkpoints.iterdir())


def test_a_torn_file_is_not_selected(tmp_path):
    rd = RunDir(tmp_path / "run").create()
    _complete(rd.checkpoint_path(2), 2)
    torn = _complete(rd.checkpoint_path(4), 4)
    with open(torn / "model.safetensors", "r+b") as fh:
        fh.truncate(3)
    assert rd.latest_checkpoint().step == 2
    rd.clean_partial_checkpoints()
    assert not torn.exists() and read_manifest(rd.checkpoint_path(2)).step == 2
    assert os.listdir(rd.checkpoints) == ["step-000002"]
