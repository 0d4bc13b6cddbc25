"""Profiling on Ray (local mode, 2 CPUs, started once for this module): shards merged on the driver equal
the one-process profile counter for counter, also when a task dies mid-shard and is retried, and when
a failed run is resumed; Ray is imported only with --workers; bad cluster input gets one line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from moescope.backends.hf.loading import load_model, load_tokenizer
from moescope.calibration import CALIBRATION, DEMO_MODEL, load_calibration
from moescope.cli import main
from moescope.errors import MoescopeError
from moescope.profiling.ray_run import ClusterOptions, FailOnce, profile_on_ray, shard_prompts
from moescope.profiling.run import ProfileOptions, profile_model

ray = pytest.importorskip("ray")
OPTIONS = dict(generate=2, batch_size=2, max_tokens=24, coactivation=True, progress=False)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    """Eight prompts of the embedded set (every domain), as a file and as the one-process profile of it."""
    tmp = tmp_path_factory.mktemp("cal")
    lines = open(CALIBRATION, encoding="utf-8").read().splitlines()[::27][:8]
    path = tmp / "cal.jsonl"
    path.write_text("\n".join(lines) + "\n")
    local = profile_model(load_model(DEMO_MODEL), load_tokenizer(DEMO_MODEL), load_calibration(path), tmp / "local",
                          ProfileOptions(**OPTIONS))
    return path, local


def assert_same(a, b) -> None:
    assert a.prompts == b.prompts and a.domains == b.domains and a.langs == b.langs and a.settings == b.settings
    assert a.layers == b.layers and set(a.counters) == set(b.counters)
    for name in a.counters:
        np.testing.assert_array_equal(a.counters[name], b.counters[name], err_msg=name)


def test_shards_are_whole_batches_in_file_order():
    prompts = list(range(9))
    assert shard_prompts(prompts, 2, 2, 20) == [[0, 1, 2, 3, 4, 5], [6, 7, 8]]
    assert shard_prompts(prompts, 2, 2, 1) == [[0, 1], [2, 3], [4, 5], [6, 7], [8]]  # no shard over a checkpoint
    assert shard_prompts(prompts, 4, 8, 20) == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]


def test_two_workers_equal_one_process(calibration, tmp_path, capsys):
    path, local = calibration
    assert main(["profile", str(DEMO_MODEL), "--calibration", str(path), "--out", str(tmp_path / "p"),
                 "--workers", "2", "--generate", "2", "--batch-size", "2", "--max-tokens", "24",
                 "--coactivation"]) == 0
    assert "profiled 8 prompts" in capsys.readouterr().out
    from moescope.profiling.store import Profile

    assert_same(Profile.load(tmp_path / "p"), local)


@pytest.mark.parametrize("exit", [False, True], ids=["raises", "process-dies"])
def test_a_task_killed_mid_shard_is_retried_and_counted_once(calibration, tmp_path, exit):
    path, local = calibration
    marker = tmp_path / "failed-once"
    cluster = ClusterOptions(workers=2, fail_once=FailOnce(1, str(marker), exit))
    profile = profile_on_ray(DEMO_MODEL, load_calibration(path), tmp_path / "p", ProfileOptions(**OPTIONS), cluster)
    assert marker.exists()  # the hook did fire, after the shard's first batch of two
    assert_same(profile, local)


def test_a_failed_run_resumes_with_the_missing_shards(calibration, tmp_path):
    path, local = calibration
    prompts, options = load_calibration(path), ProfileOptions(**OPTIONS, checkpoint_every=1)
    failing = ClusterOptions(workers=1, retries=0, fail_once=FailOnce(2, str(tmp_path / "marker")))
    with pytest.raises(MoescopeError, match="shard 2 failed.*--resume"):
        profile_on_ray(DEMO_MODEL, prompts, tmp_path / "p", options, failing)
    kept = sorted(d.name for d in (tmp_path / "p.partial" / "shards").glob("shard-*"))
    assert kept == ["shard-00000", "shard-00001"]
    state = json.loads((tmp_path / "p.partial" / "cluster.json").read_text())
    assert state["shard_sizes"] == [2, 2, 2, 2]
    resumed = profile_on_ray(DEMO_MODEL, prompts, tmp_path / "p", ProfileOptions(**OPTIONS, checkpoint_every=1,
                                                                                 resume=True), ClusterOptions(1))
    assert_same(resumed, local)
    assert not (tmp_path / "p.partial").exists()


def test_without_workers_ray_is_never_imported(tmp_path):
    code = ("import sys; from moescope.cli import main; "
            f"main(['profile', {str(DEMO_MODEL)!r}, '--calibration', {str(CALIBRATION)!r}, '--out', "
            f"{str(tmp_path / 'p')!r}, '--max-tokens', '8', '--domains', 'math']); print('ray' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"


def cli_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_bad_cluster_input_gets_one_line(calibration, tmp_path, capsys, monkeypatch):
    path, _ = calibration
    base = ["profile", str(DEMO_MODEL), "--calibration", str(path), "--out", str(tmp_path / "p")]
    err = cli_error(capsys, base + ["--workers", "2", "--ray-address", "127.0.0.1:1"])
    assert "cannot reach the Ray cluster at 127.0.0.1:1" in err
    assert "needs --workers" in cli_error(capsys, base + ["--ray-address", "127.0.0.1:1"])
    assert "--trace is not available" in cli_error(capsys, base + ["--workers", "2", "--trace", str(tmp_path / "t")])
    assert "does not exist" in cli_error(capsys, ["profile", str(tmp_path / "nowhere"), "--calibration", str(path),
                                                  "--out", str(tmp_path / "p"), "--workers", "2"])
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert "pip install 'moescope[ray]'" in cli_error(capsys, base + ["--workers", "2"])
    assert not (tmp_path / "p").exists()
