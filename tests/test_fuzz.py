"""A fuzz harness for every parser of files anyone can edit: calibration JSONL, prune and bit plans,
profile.json, safetensors headers, checkpoint indexes, accuracy files, and the number arguments.

The property is the README's promise: whatever the bytes, a parser either returns something the code
after it can use, or raises MoescopeError (one line at the CLI); never another exception. Where
another reader exists, it must agree: a safetensors header that moescope accepts, safetensors loads.

The suite runs each target briefly (MOESCOPE_FUZZ_EXAMPLES, default 40 examples); `make fuzz` runs
them long (docs/reliability.md records the length and the result).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moescope.analysis.accuracy import accuracy_lines, load_accuracy
from moescope.calibration import load_calibration
from moescope.checkpoints import DTYPE_BITS, INDEX_NAME, read_header, shards
from moescope.commands.common import SHARE, bounded
from moescope.errors import MoescopeError
from moescope.output import parse_json
from moescope.plans import BitPlan, PrunePlan
from moescope.profiling.store import META_FILE, Profile

EXAMPLES = int(os.environ.get("MOESCOPE_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# JSON values of every kind, including what Python's json writes but JSON does not allow (NaN,
# Infinity), integers past 4,300 digits' worth of int conversion, and lone surrogates.
SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(min_value=10**30) | st.floats()
           | st.text(max_size=20) | st.sampled_from(["\ud800", "", "0", "-1", "../x", "/etc/passwd", "nan"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8) | st.sampled_from(["layers", "model", "top_k"]), inner,
                                        max_size=4), max_leaves=12)


def mutated(document):
    """A strategy of `document` (parsed JSON) with one value somewhere in it replaced or removed."""
    paths = []

    def walk(node, path):
        paths.append(path)
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, child in children:
            walk(child, (*path, key))

    walk(document, ())

    def apply(path, value, drop):
        copy = json.loads(json.dumps(document))
        if not path:
            return value
        parent = copy
        for key in path[:-1]:
            parent = parent[key]
        if drop and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
        return copy

    return st.builds(apply, st.sampled_from(paths), VALUES, st.booleans())


def as_text(value) -> str:
    """JSON text of `value`, non-ASCII kept where it can be written as UTF-8 (lone surrogates escaped)."""
    text = json.dumps(value, ensure_ascii=False)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return json.dumps(value)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def lines_of_calibration():
    record = st.fixed_dictionaries({"id": SCALARS, "domain": SCALARS, "lang": SCALARS},
                                   optional={"text": SCALARS, "messages": VALUES, "expect": VALUES})
    line = (record.map(as_text) | VALUES.map(as_text)).map(str.encode) | st.binary(max_size=40)
    return st.lists(line, max_size=5)


@FUZZ
@given(lines=lines_of_calibration())
def test_calibration_jsonl(scratch, lines):
    path = scratch / "cal.jsonl"
    path.write_bytes(b"\n".join(lines))
    try:
        prompts = load_calibration(path)
    except MoescopeError as error:
        assert "\n" not in str(error) and str(path) in str(error)
        return
    for prompt in prompts:
        assert isinstance(prompt.id, str) and prompt.hash and (prompt.text or prompt.messages)


@FUZZ
@given(text=st.text(max_size=60) | VALUES.map(as_text))
def test_parse_json(text):
    try:
        parse_json(text, "x")
    except MoescopeError:
        pass


PRUNE_PLAN = {"format_version": 1, "kind": "prune_plan", "model": {"model_type": "qwen3_moe", "config_hash": "ab"},
              "top_k": 2, "criterion": "gate-mass", "source": {},
              "layers": [{"layer": 0, "num_experts": 8, "prune": [1, 2]}, {"layer": 1, "num_experts": 8, "prune": []}]}
BIT_PLAN = {"format_version": 1, "kind": "bit_plan", "model": {"model_type": "qwen3_moe", "config_hash": "ab"},
            "method": "tiers", "group_size": 128, "symmetric": True, "scales": "minmax", "non_expert_bits": 16,
            "layers": {"0": [8, 4, 4, 2], "1": [4, 4, 4, 4]}, "source": {}}


@FUZZ
@given(data=mutated(PRUNE_PLAN) | VALUES)
def test_prune_plans(data):
    from moescope.identity import ModelIdentity

    try:
        plan = PrunePlan.from_json(data)
    except MoescopeError:
        return
    plan.to_json()
    try:
        plan.check(ModelIdentity("qwen3_moe", "ab"), {0: 8, 1: 8}, 2)
    except MoescopeError:
        return
    assert all(len(plan.kept(layer)) >= plan.top_k for layer in plan.num_experts)


@FUZZ
@given(data=mutated(BIT_PLAN) | VALUES)
def test_bit_plans(data):
    try:
        plan = BitPlan.from_dict(data)
    except MoescopeError:
        return
    assert plan.average_bits() > 0 and plan.options.group_size >= 1
    BitPlan.from_dict(plan.to_dict())


@pytest.fixture(scope="module")
def real_profile(inputs):
    return inputs.profile


@FUZZ
@given(data=st.data())
def test_profile_json(real_profile, scratch, data):
    from moescope.analysis.analyse import StatsOptions, analyse

    meta = json.loads((real_profile / META_FILE).read_text())
    variant = data.draw(mutated(meta))
    target = scratch / "profile"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(real_profile, target)
    (target / META_FILE).write_text(as_text(variant))
    try:
        profile = Profile.load(target)
    except MoescopeError:
        return
    analyse(profile, StatsOptions(bootstrap=2, orderings=2))  # whatever it accepts, the analysis can use


DTYPES = st.sampled_from([*DTYPE_BITS, "Q9", "f32", ""])
ENTRY = st.fixed_dictionaries({"dtype": DTYPES | SCALARS, "shape": st.lists(st.integers(-2, 6), max_size=3) | VALUES,
                               "data_offsets": st.lists(st.integers(-4, 80), min_size=2, max_size=2) | VALUES})
HEADER = st.dictionaries(st.text(min_size=1, max_size=6), ENTRY, max_size=3) | VALUES


def safetensors_bytes(header, data_size: int, length_shift: int) -> bytes:
    text = as_text(header).encode()
    return struct.pack("<Q", max(0, len(text) + length_shift)) + text + b"\x00" * data_size


@FUZZ
@given(header=HEADER, data_size=st.integers(0, 80), shift=st.integers(-3, 3) | st.just(0),
       raw=st.none() | st.binary(max_size=30))
def test_safetensors_headers(scratch, header, data_size, shift, raw):
    from safetensors import safe_open

    path = scratch / "x.safetensors"
    path.write_bytes(raw if raw is not None else safetensors_bytes(header, data_size, shift))
    try:
        parsed = read_header(path)
    except MoescopeError:
        return
    with safe_open(str(path), framework="numpy") as handle:  # what moescope accepts, safetensors reads
        for name in parsed:
            if name != "__metadata__" and parsed[name]["dtype"] in ("F32", "I64", "U8", "F16"):
                handle.get_tensor(name)


@FUZZ
@given(index=st.fixed_dictionaries({"weight_map": st.dictionaries(st.text(max_size=5), SCALARS, max_size=4)})
       | VALUES)
def test_checkpoint_indexes(scratch, index):
    directory = scratch / "checkpoint"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    (directory / "a.safetensors").write_bytes(b"")
    (directory / INDEX_NAME).write_text(as_text(index))
    try:
        names = shards(directory)
    except MoescopeError:
        return
    assert all((directory / name).resolve().parent == directory.resolve() for name in names)


ACCURACY = {"format_version": 1, "kind": "expert_accuracy", "items": 4, "correct": 2, "accuracy": 0.5,
            "few_items": 10, "layers": [{"layer": 0, "experts": [
                {"expert": 0, "items": 4, "correct": 2, "accuracy": 0.5, "ci": [0.2, 0.8], "few": True},
                {"expert": 1, "items": 0, "correct": 0, "accuracy": None, "ci": None, "few": True}]}]}


@FUZZ
@given(data=mutated(ACCURACY))
def test_accuracy_files(scratch, data):
    from moescope.report.page import accuracy_section

    (scratch / "acc.json").write_text(as_text(data))
    try:
        result = load_accuracy(scratch / "acc.json")
    except MoescopeError:
        return
    accuracy_lines(result)
    accuracy_section(result)


@FUZZ
@given(text=st.text(max_size=12) | st.sampled_from(["nan", "inf", "-0", "1e999", "9" * 4000, "9" * 5000, "0x10", " 3 ",
                                                    "1_0"]))
def test_number_arguments(text):
    for parse, low, high in ((bounded(int, 1), 1, None), (SHARE, 0, 1), (bounded(float), None, None)):
        try:
            value = parse(text)
        except argparse.ArgumentTypeError:
            continue
        assert (low is None or value >= low) and (high is None or value < high)
        assert isinstance(value, int) or np.isfinite(value)
