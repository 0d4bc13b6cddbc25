"""Outputs under hostile use (moescope.output): an output is never, never holds and never sits inside an
input or a checkpoint; a crafted index never makes moescope read or write outside the checkpoint; an
output is replaced only with --overwrite, and only if moescope wrote it; two runs never write one
output at once; a full disk and a killed run leave nothing behind that the next run does not clean.
Every refusal is one line with exit status 2, and the inputs hash the same before and after."""

from __future__ import annotations

import fcntl
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import listing, refused, tree_hash

from moescope.cli import main


@pytest.fixture
def work(inputs, tmp_path):
    """Copies of the shared inputs in this test's own directory (the model, the profile, both plans)."""
    for name in ("model", "profile"):
        shutil.copytree(getattr(inputs, name), tmp_path / name)
    for name in ("cal.jsonl", "prune.json", "bits.json"):
        shutil.copy(inputs.root / name, tmp_path / name)
    return tmp_path


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: extra threads only spin on shared cores


def moescope(*argv, **options) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moescope.cli", *map(str, argv)], capture_output=True, text=True,
                          env=ONE_THREAD, **options)


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_an_index_cannot_lead_outside_the_checkpoint(work, capsys, where):
    """A crafted model.safetensors.index.json names a shard outside the checkpoint: prune used to read it
    and write its pruned copy over it. Now every verb refuses before reading it."""
    model, elsewhere = work / "model", work / "elsewhere" / "model.safetensors"
    elsewhere.parent.mkdir()
    shutil.copy(model / "model-00001-of-00012.safetensors", elsewhere)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../elsewhere/model.safetensors" if where == "relative" else str(elsewhere)
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    before, names = tree_hash(work), listing(work)
    for argv in (["inspect", model], ["quantize", model, "--bits", "4", "--out", work / "q"],
                 ["prune", model, "--plan", work / "prune.json", "--out", work / "pruned", "--replay-prompts", "0"]):
        assert "which is not a file inside" in refused(capsys, *argv)
    assert tree_hash(work) == before and listing(work) == names


OVER_INPUTS = {
    "quantize into the model's parent": (lambda w: ["quantize", w / "model", "--bits", "4", "--out", w, "--overwrite"],
                                         "holds the input"),
    "profile over the model": (lambda w: ["profile", w / "model", "--calibration", w / "cal.jsonl", "--out",
                                          w / "model", "--overwrite"], "is the input"),
    "profile inside the model": (lambda w: ["profile", w / "model", "--calibration", w / "cal.jsonl", "--out",
                                            w / "model" / "profile"], "is inside the input"),
    "merge over a profile": (lambda w: ["merge", w / "profile", w / "other", "--out", w / "profile", "--overwrite"],
                             "is the input"),
    "report over a weight file": (lambda w: ["report", w / "profile", "--out",
                                             w / "model" / "model-00001-of-00012.safetensors", "--overwrite"],
                                  "is inside the checkpoint"),
    "plan over config.json": (lambda w: ["plan", "prune", w / "profile", "--ratio", "0.1", "--out",
                                         w / "model" / "config.json", "--overwrite"], "is inside the checkpoint"),
    "export over its plan": (lambda w: ["export", w / "bits.json", "--format", "mlx", "--out", w / "bits.json",
                                        "--overwrite"], "is the input"),
    "prune into the model": (lambda w: ["prune", w / "model", "--plan", w / "prune.json", "--out",
                                        w / "model" / "pruned"], "is inside the input"),
    "quantize through a symlink to the model": (lambda w: ["quantize", w / "model", "--bits", "4", "--out", w / "link",
                                                           "--overwrite"], "is the input"),
    "sweep into the profile": (lambda w: ["sweep", "prune", w / "model", "--profile", w / "profile", "--out",
                                          w / "profile" / "sweep"], "is inside the input"),
    "a trace inside the profile": (lambda w: ["profile", w / "model", "--calibration", w / "cal.jsonl", "--out",
                                              w / "p", "--trace", w / "p" / "t.parquet"], "overlap"),
    "the gate's page and JSON in one file": (lambda w: ["gate", w / "model", w / "model", "--out", w / "g",
                                                        "--json", w / "g"], "overlap"),
}


@pytest.mark.parametrize("case", OVER_INPUTS)
def test_an_output_never_replaces_or_enters_an_input(work, capsys, case):
    shutil.copytree(work / "profile", work / "other")
    (work / "link").symlink_to(work / "model")
    argv, message = OVER_INPUTS[case]
    before, names = tree_hash(work), listing(work)
    assert message in refused(capsys, *argv(work))
    assert tree_hash(work) == before and listing(work) == names


def test_outputs_are_replaced_only_with_overwrite_and_only_moescope_own(work, capsys):
    report = ["report", work / "profile", "--out", work / "r.html", "--bootstrap", "5", "--orderings", "2"]
    assert main(list(map(str, report))) == 0
    first = tree_hash(work / "r.html")
    assert "already exists; pass --overwrite" in refused(capsys, *report)
    assert tree_hash(work / "r.html") == first
    assert main(list(map(str, [*report, "--overwrite"]))) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(work / "r.html").st_mode & 0o777 == 0o666 & ~umask  # not the temporary's private 0600
    (work / "folder").mkdir()
    assert "is a directory, but this output is a file" in refused(capsys, "report", work / "profile", "--out",
                                                                   work / "folder", "--overwrite")
    (work / "mine").mkdir()
    (work / "mine" / "notes.txt").write_text("not moescope's")
    before = tree_hash(work / "mine")
    line = refused(capsys, "quantize", work / "model", "--bits", "4", "--out", work / "mine", "--overwrite")
    assert "is not a checkpoint written by moescope" in line and tree_hash(work / "mine") == before
    assert main(["quantize", str(work / "model"), "--bits", "4", "--out", str(work / "q")]) == 0
    assert main(["quantize", str(work / "model"), "--bits", "8", "--out", str(work / "q"), "--overwrite"]) == 0
    assert json.loads((work / "q" / "bit_plan.json").read_text())["layers"]["0"][0] == 8


def test_a_trace_named_as_a_directory_is_refused_and_leaves_nothing(work, capsys, monkeypatch):
    monkeypatch.chdir(work)
    names = listing(work)
    line = refused(capsys, "profile", "model", "--calibration", "cal.jsonl", "--out", "p", "--trace", "out/")
    assert "names a directory" in line and listing(work) == names


def test_directories_made_for_a_failed_output_are_removed(work, capsys):
    (work / "bad.json").write_text('{"kind": "bit_plan"')
    names = listing(work)
    refused(capsys, "quantize", work / "model", "--plan", work / "bad.json", "--out", work / "new" / "deep" / "q")
    assert listing(work) == names


def test_an_output_being_written_by_another_run_is_refused(work, capsys):
    lock = work / ".q.lock"
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        line = refused(capsys, "quantize", work / "model", "--bits", "4", "--out", work / "q")
    assert "another moescope is writing" in line and not (work / "q").exists()


def test_two_runs_writing_one_output_at_once(work):
    """Two `quantize --out X` started together: one writes X, the other stops in one line."""
    argv = [sys.executable, "-m", "moescope.cli", "quantize", str(work / "model"), "--bits", "4", "--out",
            str(work / "q")]
    runs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ONE_THREAD)
            for _ in range(2)]
    results = sorted((run.wait(), run.stderr.read()) for run in runs)
    assert [code for code, _ in results] == [0, 2]
    loser = [line for line in results[1][1].splitlines() if "error:" in line]
    assert len(loser) == 1 and ("another moescope is writing" in loser[0] or "already exists" in loser[0])
    assert (work / "q" / "bit_plan.json").is_file()
    assert not [name for name in os.listdir(work) if name.startswith(".q.")]


def test_stale_temporaries_of_the_same_output_are_removed_with_a_message(work, capsys):
    """What a SIGKILL leaves: the hidden temporary of a directory or a file, named as moescope names them."""
    stale_dir = Path(tempfile.mkdtemp(prefix=".q.", suffix=".partial", dir=work))
    (stale_dir / "model-00001-of-00012.safetensors").write_bytes(b"half")
    stale_file = Path(tempfile.mkstemp(prefix=".r.html.", suffix=".tmp", dir=work)[1])
    others = [work / ".qq.abcdefgh.partial", work / ".q.keep"]  # another output's, and not a temporary
    for other in others:
        other.mkdir()
    assert main(["quantize", str(work / "model"), "--bits", "4", "--out", str(work / "q")]) == 0
    assert main(["report", str(work / "profile"), "--out", str(work / "r.html"), "--bootstrap", "5"]) == 0
    err = capsys.readouterr().err
    assert f"removed {stale_dir}, left by an interrupted run" in err
    assert f"removed {stale_file}, left by an interrupted run" in err
    assert not stale_dir.exists() and not stale_file.exists() and all(other.exists() for other in others)


def size_limit(size: int):
    """For the child: files may grow to `size` bytes only, and writing past that fails (EFBIG) as on a
    full disk, instead of killing the process (SIGXFSZ ignored)."""
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return limit


@pytest.mark.parametrize("verb", ["quantize", "profile", "report"])
def test_a_write_that_fails_midway_leaves_nothing(work, verb):
    """Every kind of writer (a checkpoint, a profile with its trace, a file) under a file-size limit its
    output exceeds: exit 2, one line, no partial output anywhere."""
    (work / "out").mkdir()
    argv = {"quantize": ["quantize", work / "model", "--bits", "4", "--out", work / "out" / "q"],
            "profile": ["profile", work / "model", "--calibration", work / "cal.jsonl", "--out", work / "out" / "p",
                        "--trace", work / "out" / "t.parquet"],
            "report": ["report", work / "profile", "--out", work / "out" / "r.html", "--bootstrap", "5"]}[verb]
    before = tree_hash(work / "model")
    result = moescope(*argv, preexec_fn=size_limit(2048))
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(errors) == 1 and "File too large" in errors[0], result.stderr
    assert os.listdir(work / "out") == [] and tree_hash(work / "model") == before


def can_mount_tmpfs() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                              capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs user namespaces to mount a small tmpfs")
@pytest.mark.parametrize(("verb", "options", "message"), [("quantize", "size=8k", "No space left on device"),
                                                          ("report", "size=8k", "No space left on device"),
                                                          ("quantize", "ro", "Read-only file system")])
def test_a_full_or_read_only_disk_leaves_nothing(work, verb, options, message):
    """A real full (or read-only) file system: a small tmpfs in a private mount namespace."""
    mount = work / "small"
    mount.mkdir()
    argv = {"quantize": ["quantize", work / "model", "--bits", "4", "--out", mount / "q"],
            "report": ["report", work / "profile", "--out", mount / "r.html", "--bootstrap", "5"]}[verb]
    command = " ".join(map(str, [sys.executable, "-m", "moescope.cli", *argv]))
    script = f"mount -t tmpfs -o {options} tmpfs {mount} && {command}; code=$?; ls -A {mount}; exit $code"
    before = tree_hash(work)
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=ONE_THREAD)
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert result.stdout.strip() == "" and tree_hash(work) == before  # nothing on the full disk, nothing changed
