"""Where a model runs: `--device`, `--dtype` and `--max-memory` on every verb that runs one, a model
split across memory and disk giving the unsplit model's numbers, bad placements refused in one line
with nothing written, and a profiler whose hot path never waits for the device."""

from __future__ import annotations

import dataclasses
import json
import re
import sys

import pytest
import torch
from helpers import WORDS, save_with_tokenizer, write_calibration
from safetensors.torch import load_file

from moescope.backends.hf.loading import Placement, check_device, input_device, load_model, parse_max_memory
from moescope.backends.hf.offload import any_offloaded
from moescope.cli import main
from moescope.errors import MoescopeError
from moescope.models.footprint import footprint
from moescope.models.inspection import inspect_checkpoint
from moescope.models.tiny import tiny_model
from moescope.profiling.store import FIXED, Profile

# The tiny qwen3_moe checkpoint holds 563 KB at float32: with 550 KB of memory, accelerate keeps the
# embeddings and layer 0 in memory and puts layer 1, the final norm and the head on disk.
SPLIT = ["--device", "auto", "--max-memory", "cpu=550KB,disk"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("devices")
    save_with_tokenizer(tiny_model("qwen3_moe"), root / "model")
    write_calibration(root / "cal.jsonl", 9)
    gen = torch.Generator().manual_seed(0)
    rows = [{"id": f"e{i}", "domain": ["math", "code"][i % 2], "lang": "en",
             "text": " ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (12,), generator=gen))}
            for i in range(24)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = [{"id": f"q{i}", "domain": "math", "lang": "en", "text": f"{WORDS[i]} plus {WORDS[i + 1]} equals",
              "choices": ["one", "two", "three"], "answer": i % 3} for i in range(6)]
    (root / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    assert main(["profile", str(root / "model"), "--calibration", str(root / "cal.jsonl"), "--out",
                 str(root / "profile")]) == 0
    assert main(["plan", "prune", str(root / "profile"), "--criterion", "frequency", "--ratio", "0.25", "--out",
                 str(root / "plan.json")]) == 0
    return root


def profile_args(files, out, *extra):
    return ["profile", str(files / "model"), "--calibration", str(files / "cal.jsonl"), "--out", str(out),
            "--generate", "3", "--batch-size", "4", "--saliency", "--coactivation", *extra]


def evaluate_json(files, capsys, *extra) -> dict:
    capsys.readouterr()
    assert main(["evaluate", str(files / "model"), "--baseline", str(files / "model"), "--data",
                 str(files / "data.jsonl"), "--seq-len", "16", "--sequences", "4", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def assert_same_profile(a: Profile, b: Profile) -> None:
    assert a.prompts == b.prompts and set(a.counters) == set(b.counters)
    for name in a.counters:
        assert (a.counters[name] == b.counters[name]).all(), name


def assert_same_choices(a: Profile, b: Profile) -> None:
    """Profiles of one model on two devices: every count the same (the same experts chosen), and the
    fixed-point sums of routing weights equal to float32 rounding (another device sums in another order)."""
    assert a.prompts == b.prompts and set(a.counters) == set(b.counters)
    for name in a.counters:
        if name in FIXED:
            assert a.counters[name] == pytest.approx(b.counters[name], rel=1e-4), name
        else:
            assert (a.counters[name] == b.counters[name]).all(), name


def assert_same_weights(a, b, share: float = 1.0) -> None:
    """The same tensors in two checkpoints: all equal, or (across devices, where a weight halfway between
    two grid points may round the other way) at least `share` of every tensor's values."""
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert first.keys() == second.keys()
    for name in first:
        assert (first[name] == second[name]).float().mean() >= share, name


def test_split_across_memory_and_disk_gives_the_unsplit_numbers(files, tmp_path, capsys):
    split = load_model(files / "model", Placement("auto", "float32", *parse_max_memory("cpu=550KB,disk")))
    assert set(split.hf_device_map.values()) == {"cpu", "disk"} and any_offloaded(split)
    assert input_device(split) == torch.device("cpu")
    assert main(profile_args(files, tmp_path / "whole", "--dtype", "float32")) == 0
    assert main(profile_args(files, tmp_path / "split", "--dtype", "float32", *SPLIT)) == 0
    whole = Profile.load(tmp_path / "whole")
    assert_same_profile(whole, Profile.load(tmp_path / "split"))
    assert whole.counters["saliency_sum"].any() and whole.counters["tokens"][1].sum() > 0  # generation counted
    unsplit = evaluate_json(files, capsys, "--dtype", "float32")
    divided = evaluate_json(files, capsys, "--dtype", "float32", *SPLIT)
    assert divided["protocol"]["placement"]["device"] == "auto"
    assert divided["groups"] == unsplit["groups"] and divided["routing_drift"] == unsplit["routing_drift"]
    for name, how in (("q4", ["--bits", "4"]),
                      ("budget", ["--budget", "3", "--profile", str(files / "profile"), "--calibration",
                                  str(files / "cal.jsonl"), "--calibration-tokens", "64"])):
        for where, placement in (("whole", []), ("split", SPLIT)):
            assert main(["quantize", str(files / "model"), *how, "--dtype", "float32", *placement,
                         "--out", str(tmp_path / f"{name}-{where}")]) == 0
        assert_same_weights(tmp_path / f"{name}-whole", tmp_path / f"{name}-split")
        plans = [json.loads((tmp_path / f"{name}-{w}" / "bit_plan.json").read_text()) for w in ("whole", "split")]
        assert plans[0] == plans[1]
    original = load_file(files / "model" / "model.safetensors")
    quantised = load_file(tmp_path / "q4-split" / "model.safetensors")  # the disk-offloaded layer too
    assert not torch.equal(original["model.layers.1.mlp.experts.0.down_proj.weight"],
                           quantised["model.layers.1.mlp.experts.0.down_proj.weight"])


def every_verb(files, out, *where: str) -> dict[str, list[str]]:
    """One command line per verb that runs a model, each writing under `out`, with the options `where`."""
    model = str(files / "model")
    protocol = ["--data", str(files / "data.jsonl"), "--seq-len", "16", "--sequences", "2", "--dtype", "float32"]
    return {
        "profile": profile_args(files, out / "profile", *where),
        "evaluate": ["evaluate", model, "--baseline", model, "--json", *protocol, *where],
        "quantize": ["quantize", model, "--bits", "3", "--out", str(out / "q3"), *where],
        "prune": ["prune", model, "--plan", str(files / "plan.json"), "--calibration", str(files / "cal.jsonl"),
                  "--replay-prompts", "4", "--out", str(out / "pruned"), *where],
        "sweep prune": ["sweep", "prune", model, "--profile", str(files / "profile"), "--ratios", "0.25",
                        "--criteria", "frequency", "--out", str(out / "sweep-prune"), *protocol, *where],
        "sweep quant": ["sweep", "quant", model, "--profile", str(files / "profile"), "--bits", "4",
                        "--out", str(out / "sweep-quant"), *protocol, *where],
        "gate": ["gate", model, model, "--probes", str(files / "cal.jsonl"), "--max-new-tokens", "3",
                 "--out", str(out / "gate.html"), *where],
        "accuracy": ["accuracy", model, "--items", str(files / "items.jsonl"), "--out", str(out / "acc.json"),
                     *where],
    }


def numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+\.?\d*(?:e-?\d+)?", text)]


# auto: everything on the CPU on a machine without a GPU, on the GPU(s) where there are some
OTHER_DEVICES = ["auto"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", OTHER_DEVICES)
def test_every_verb_runs_with_the_cpus_results(files, tmp_path, capsys, device):
    """Each verb that runs a model, with --device cpu and with `device`: the same counts and weights,
    and the same figures to float32 rounding (a GPU sums in another order)."""
    outputs = {}
    for where in ("cpu", device):
        (tmp_path / where).mkdir()
        for verb, args in every_verb(files, tmp_path / where, "--device", where).items():
            capsys.readouterr()
            assert main(args) == 0, verb
            outputs[where, verb] = " ".join(capsys.readouterr().out.replace(str(tmp_path / where), "OUT").split())
    assert_same_choices(Profile.load(tmp_path / "cpu" / "profile"), Profile.load(tmp_path / device / "profile"))
    assert_same_weights(tmp_path / "cpu" / "q3", tmp_path / device / "q3", share=1.0 if device == "cpu" else 0.999)
    reports = [json.loads(outputs[where, "evaluate"]) for where in ("cpu", device)]
    assert numbers(json.dumps(reports[0]["groups"])) == pytest.approx(numbers(json.dumps(reports[1]["groups"])),
                                                                      rel=1e-4)
    for name in ("sweep-prune/sweep.csv", "sweep-quant/sweep.csv", "acc.json"):
        assert numbers((tmp_path / "cpu" / name).read_text()) == pytest.approx(
            numbers((tmp_path / device / name).read_text()), rel=1e-4), name
    assert outputs["cpu", "prune"] == outputs[device, "prune"] and "replay of 4 prompts" in outputs["cpu", "prune"]


def test_the_demo_takes_the_same_placement():
    from moescope.cli import build_parser
    from moescope.commands.common import placement_from_args

    args = build_parser("demo").parse_args(["demo", "--device", "auto", "--max-memory", "cpu=2GiB"])
    assert placement_from_args(args) == Placement("auto", "float32", {"cpu": 2 * 2**30}, False)


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@pytest.mark.parametrize("placement, message", [
    pytest.param(["--device", "cuda"], "--device cuda: this torch was built without CUDA" if torch.version.cuda
                 is None else "--device cuda: no CUDA device is visible", marks=NO_CUDA),
    pytest.param(["--device", "cuda:3"], "--device cuda:3: ", marks=NO_CUDA),
    (["--device", "tpu"], "--device tpu: give cpu, cuda, cuda:N or auto"),
    (["--device", "auto", "--max-memory", "cpu=100KB"], "cannot hold the model"),
    (["--max-memory", "cpu=1GB"], "--max-memory splits a model across devices: it needs --device auto"),
    (["--device", "auto", "--max-memory", "cpu=lots"], "--max-memory: 'lots' is not a size"),
    (["--device", "auto", "--max-memory", "gpu=1GB"], "write DEVICE=SIZE pairs"),
])
@pytest.mark.parametrize("verb", ["profile", "quantize", "prune", "gate", "accuracy", "sweep prune", "evaluate"])
def test_bad_placements_are_one_line_and_write_nothing(files, tmp_path, capsys, verb, placement, message):
    args = every_verb(files, tmp_path, *placement)[verb]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # gate logs its progress first
    assert last.startswith(f"moescope {verb.split()[0]}: error: ") and message in last and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_gpu_index_past_the_last_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_device("cuda:1")
    with pytest.raises(MoescopeError, match=r"--device cuda:2: this machine has 2 CUDA device\(s\), cuda:0 to cuda:1"):
        check_device("cuda:2")
    with pytest.raises(MoescopeError, match="--max-memory cuda:5"):
        Placement("auto", None, {5: 2**30}).check()


def test_max_memory_is_read_per_device():
    assert parse_max_memory("0=70GiB, 1=1.5TB,cpu=200gib,disk") == (
        {0: 70 * 2**30, 1: 1_500_000_000_000, "cpu": 200 * 2**30}, True)
    assert parse_max_memory("cpu=123456") == ({"cpu": 123456}, False)
    with pytest.raises(MoescopeError, match="not a size above zero"):
        parse_max_memory("cpu=0GB")


class SyncCounter:
    """Counts calls that make the host wait for the device, made from the profiler's own modules."""

    WATCHED = ("moescope/backends/hf/capture.py", "moescope/profiling/accumulator.py", "moescope/profiling/run.py")

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, str, str]] = []
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "numpy", "cpu", "nonzero"):
            monkeypatch.setattr(torch.Tensor, name, self.wrap(getattr(torch.Tensor, name), name))
        for name in ("bincount", "nonzero", "unique", "masked_select"):
            monkeypatch.setattr(torch, name, self.wrap(getattr(torch, name), name))
        getitem = torch.Tensor.__getitem__

        def select(tensor, index):  # a boolean mask as an index: its size must be read on the host
            parts = index if isinstance(index, tuple) else (index,)
            if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
                self.note("boolean index")
            return getitem(tensor, index)

        monkeypatch.setattr(torch.Tensor, "__getitem__", select)

    def note(self, name: str) -> None:
        """Record (module, the watched functions on the stack, what was called) when the caller is watched."""
        frame, functions = sys._getframe(2), []

        def watched(frame) -> bool:
            return frame is not None and frame.f_code.co_filename.replace("\\", "/").endswith(self.WATCHED)

        module = frame.f_code.co_filename.rsplit("/", 1)[-1]
        while watched(frame):
            functions.append(frame.f_code.co_name)
            frame = frame.f_back
        if functions:
            self.calls.append((module, functions, name))

    def wrap(self, function, name):
        def counted(*args, **kwargs):
            self.note(name)
            return function(*args, **kwargs)
        return counted


def test_the_profiler_never_waits_for_the_device_per_layer_or_step(files, tmp_path, monkeypatch, tiny):
    from helpers import tokenizer

    from moescope.calibration import load_calibration
    from moescope.profiling.run import STOP_CHECK, ProfileOptions, profile_model

    model, prompts = tiny("qwen3_moe"), load_calibration(files / "cal.jsonl")
    generate, batch = 2 * STOP_CHECK + 3, 4
    options = ProfileOptions(generate=generate, batch_size=batch, saliency=True, coactivation=True, progress=False)
    counter = SyncCounter(monkeypatch)
    profile = profile_model(model, tokenizer(), prompts, tmp_path / "p", options)
    monkeypatch.undo()
    assert profile.counters["tokens"][1].sum() > 0
    batches = -(-len(prompts) // batch)
    once_a_batch = {"end_batch", "export"}
    per_call = [c for c in counter.calls if c[0] != "run.py" and not once_a_batch & set(c[1])]
    assert per_call == []  # capture hooks and the accumulator: nothing per layer call or step
    in_loop = [c for c in counter.calls if c[0] == "run.py" and c[1][0] == "_run_batch"]
    # per batch: the prompts' longest and total length (host tensors), the generated count at the end, and
    # one look every STOP_CHECK steps at whether all rows ended
    assert len(in_loop) <= batches * (3 + generate // STOP_CHECK), in_loop
    assert any("end_batch" in c[1] for c in counter.calls)  # the counter does see the syncs there are


def test_inspect_sizes_a_verb_before_loading(files, capsys):
    info = inspect_checkpoint(files / "model")
    config = json.loads((files / "model" / "config.json").read_text())
    stored = footprint(info, config, "profile")
    assert stored.parts["weights"] == info["bytes_total"] and "KV cache" not in stored.parts
    bf16 = footprint(info, config, "profile", "bfloat16", batch=2, seq_len=64, generate=8)
    assert bf16.parts["weights"] == 2 * info["params_total"]
    layers, kv = config["num_hidden_layers"], config["num_key_value_heads"] * config["head_dim"]
    assert bf16.parts["KV cache"] == 2 * layers * 2 * (64 + 8) * kv * 2
    evaluate = footprint(info, config, "evaluate", "bfloat16", batch=2, seq_len=64)
    assert evaluate.parts["second model"] == bf16.parts["weights"]
    assert evaluate.parts["logits"] == 2 * 64 * config["vocab_size"] * (2 + 8)
    assert footprint(info, config, "profile", "bfloat16", batch=4, seq_len=64).total > \
        footprint(info, config, "profile", "bfloat16", batch=2, seq_len=64).total
    assert main(["inspect", str(files / "model"), "--for", "evaluate", "--dtype", "bfloat16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["memory"]["verb"] == "evaluate"


def in_sync_mode(function, mode: str, after: str):
    """`function` with CUDA's sync check in `mode` while it runs, and in `after` once it returns."""
    def run(*args, **kwargs):
        torch.cuda.set_sync_debug_mode(mode)
        try:
            return function(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(after)
    return run


def strictly(function):
    """`function` under CUDA's own check: any synchronisation inside it raises."""
    return in_sync_mode(function, "error", "default")


def leniently(function):
    """`function` outside CUDA's check, which `strictly` restores afterwards."""
    return in_sync_mode(function, "default", "error")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("saliency", [False, True])
def test_on_a_gpu_hooks_and_accumulator_never_synchronise(files, tmp_path, monkeypatch, saliency):
    """CUDA's sync check around every capture hook and every accumulator call of a profile with
    generation (saliency separately: its extra pass runs transformers' experts kernel)."""
    from helpers import tokenizer

    import moescope.backends.hf.capture as capture_module
    from moescope.backends.hf.capture import RoutingRecorder
    from moescope.calibration import load_calibration
    from moescope.profiling.accumulator import Accumulator
    from moescope.profiling.run import STOP_CHECK, ProfileOptions, profile_model

    model = tiny_model("qwen3_moe").to("cuda")
    prompts = load_calibration(files / "cal.jsonl")
    options = ProfileOptions(generate=STOP_CHECK + 2, batch_size=4, saliency=saliency, coactivation=True,
                             progress=False)
    cpu = profile_model(tiny_model("qwen3_moe"), tokenizer(), prompts, tmp_path / "cpu", options)
    monkeypatch.setattr(RoutingRecorder, "_emit", strictly(RoutingRecorder._emit))
    if saliency:  # the extra experts call runs transformers' kernel, which may wait like the model's own calls do
        monkeypatch.setattr(capture_module, "each_expert_output", leniently(capture_module.each_expert_output))
    for name in ("begin_call", "on_event", "end_call"):
        monkeypatch.setattr(Accumulator, name, strictly(getattr(Accumulator, name)))
    gpu = profile_model(model, tokenizer(), prompts, tmp_path / "gpu", options)
    for name in ("selections", "tokens", "coactivation", "presence"):  # float32: the same choices as the CPU
        assert (gpu.counters[name] == cpu.counters[name]).all(), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_layers_offloaded_to_the_cpu_give_the_gpus_numbers(files, tmp_path, capsys):
    """Layer 1 and the head kept in CPU memory and run on the GPU (accelerate's CPU offload): profile,
    evaluate and quantize (which edits the offloaded weights where they are kept) as on the GPU alone."""
    limits = "0=550KB,cpu=1GB"
    split = load_model(files / "model", Placement("auto", "float32", *parse_max_memory(limits)))
    assert set(split.hf_device_map.values()) == {0, "cpu"} and any_offloaded(split), split.hf_device_map
    where = {"gpu": ["--device", "cuda"], "split": ["--device", "auto", "--max-memory", limits]}
    for name, placement in where.items():
        assert main(profile_args(files, tmp_path / f"profile-{name}", *placement)) == 0
        assert main(["quantize", str(files / "model"), "--budget", "3", "--profile", str(files / "profile"),
                     "--calibration", str(files / "cal.jsonl"), "--calibration-tokens", "64", *placement,
                     "--out", str(tmp_path / f"q-{name}")]) == 0
    assert_same_profile(Profile.load(tmp_path / "profile-gpu"), Profile.load(tmp_path / "profile-split"))
    assert_same_weights(tmp_path / "q-gpu", tmp_path / "q-split")
    gpu, divided = (evaluate_json(files, capsys, "--dtype", "float32", *where[name]) for name in ("gpu", "split"))
    assert numbers(json.dumps(gpu["groups"])) == pytest.approx(numbers(json.dumps(divided["groups"])), rel=1e-6)


def test_rows_that_end_stop_counting_although_the_loop_looks_only_every_few_steps(files, tmp_path, tiny):
    """Decoding reads whether every row has ended only every STOP_CHECK steps; rows that ended before
    must still count no further tokens. The expected counts come from the tokens the loop fed."""
    from helpers import tokenizer

    from moescope.calibration import load_calibration
    from moescope.profiling.run import STOP_CHECK, ProfileOptions, profile_model

    model, prompts = tiny("qwen3_moe"), load_calibration(files / "cal.jsonl")[:4]
    options = ProfileOptions(generate=2 * STOP_CHECK + 1, batch_size=4, progress=False, prompt_counts=False)
    fed: list[torch.Tensor] = []  # the greedy token each call ends with: what the next step feeds
    hook = model.register_forward_hook(lambda m, args, out: fed.append(out.logits[:, -1].argmax(-1)))
    original_eos = model.generation_config.eos_token_id
    try:
        model.generation_config.eos_token_id = -1  # no token has this id: the first run feeds every step
        profile_model(model, tokenizer(), prompts, tmp_path / "free", options)
        sequences = torch.stack(fed[:-1], dim=1)  # [rows, generate]: the tokens decoding fed, in order
        eos = int(sequences[0, 2])  # row 0 ends after feeding its third token; others when they meet it
        model.generation_config.eos_token_id = eos
        profile = profile_model(model, tokenizer(), prompts, tmp_path / "stopped", options)
    finally:
        hook.remove()
        model.generation_config.eos_token_id = original_eos
    ended = [(row == eos).nonzero() for row in sequences]
    expected = [int(e[0]) + 1 if len(e) else options.generate for e in ended]
    generated = profile.counters["prompt_tokens"][:, 1].tolist()
    assert generated == expected and expected[0] == 3 and max(expected) > STOP_CHECK


def test_the_device_map_is_planned_at_the_dtype_the_model_loads_in(tmp_path):
    """A bf16 checkpoint is planned at 2 bytes a weight, unless --dtype float32 asks for 4."""
    from moescope.backends.hf.loading import device_map

    save_with_tokenizer(tiny_model("qwen3_moe").to(torch.bfloat16), tmp_path)
    room = Placement("auto", None, {"cpu": 450_000})  # the weights take 281 KB in bf16, 563 KB in float32
    assert set(device_map(tmp_path, room).values()) == {"cpu"}
    with pytest.raises(MoescopeError, match="cannot hold the model"):
        device_map(tmp_path, dataclasses.replace(room, dtype="float32"))
