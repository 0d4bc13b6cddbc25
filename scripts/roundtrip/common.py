"""What every runtime's round trip shares: the cases (models and plans), the moescope commands a user
runs, held-out windows, and the fake-quantised reference."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import moescope
from moescope.backends.hf.loading import model_on_meta
from moescope.cli import main as moescope_cli
from moescope.compress.quant.apply import uniform_plan
from moescope.models.tiny import tiny_model
from moescope.plans import BitPlan, load_bit_plan, save_bit_plan

ASSETS = Path(moescope.__file__).parent / "assets"
DEMO = ASSETS / "demo-moe"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
RANDOM_SIZES = dict(hidden_size=256, moe_intermediate_size=256, intermediate_size=512, head_dim=64, num_experts=8,
                    num_experts_per_tok=2)


@dataclass
class Case:
    """A model and the per-layer mixed plan exported for it; `sabotage_layer` is the layer whose width the
    sabotaged reference changes."""

    name: str
    model_dir: Path
    plan: BitPlan
    sabotage_layer: int


def demo_case() -> Case:
    """The demo model (rows of 128 and 64) with the issue's hand-made plan: layers at 2, 3, 2+8 and 8 bits."""
    plan = uniform_plan(model_on_meta(DEMO), 4)
    plan.layers = {0: [2] * 32, 1: [3] * 32, 2: [2] * 16 + [8] * 16, 3: [8] * 32}
    plan.method, plan.source = "budget", {"made": "scripts/roundtrip: hand-made, mixed per layer"}
    return Case("demo", DEMO, plan, sabotage_layer=1)


def random_case(work: Path) -> Case:
    """A random Qwen3-MoE with rows of 256 (so llama.cpp's k-quants apply), the demo tokenizer, and a plan
    at 4, 2, 3 and 2+8 bits with the attention at 8."""
    directory = work / "random-moe"
    if not (directory / "model.safetensors").is_file():
        # the demo's config (its hub key names, which mlx-lm reads; transformers 5 would rename num_experts and
        # rope_theta) with other sizes
        config = {**json.loads((DEMO / "config.json").read_text()), **RANDOM_SIZES}
        model = tiny_model("qwen3_moe", seed=0, **{k: config[k] for k in (*RANDOM_SIZES, "num_hidden_layers",
                                                                           "num_attention_heads", "num_key_value_heads",
                                                                           "vocab_size", "tie_word_embeddings")})
        model.to(torch.float32).save_pretrained(directory)
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name in TOKENIZER_FILES:
            shutil.copy(DEMO / name, directory / name)
    plan = uniform_plan(model_on_meta(directory), 4)
    plan.layers = {0: [4] * 8, 1: [2] * 8, 2: [3] * 8, 3: [2] * 4 + [8] * 4}
    plan.non_expert_bits = 8
    plan.method, plan.source = "budget", {"made": "scripts/roundtrip: hand-made, mixed per layer"}
    return Case("random", directory, plan, sabotage_layer=2)


def moescope(*args) -> None:
    """Run a moescope command as a user would; stop the check if it fails."""
    print("$ moescope " + " ".join(str(a) for a in args), flush=True)
    if moescope_cli([str(a) for a in args]) != 0:
        raise SystemExit(f"moescope {args[0]} failed")


def export_and_reference(case: Case, work: Path, export_args: list[str],
                         export_name: str) -> tuple[Path, BitPlan, Path]:
    """`moescope export` of the case's plan (with --coarsened-plan) and `moescope quantize --plan` of the
    coarsened plan: the export file, the coarsened plan and the fake-quantised reference."""
    save_bit_plan(case.plan, work / "plan.json")
    out = work / export_name
    moescope("export", work / "plan.json", *export_args, "--out", out, "--model", case.model_dir,
             "--coarsened-plan", work / "coarse.json")
    return out, load_bit_plan(work / "coarse.json"), reference(case, work / "coarse.json", work / "reference")


def reference(case: Case, plan_path: Path, out: Path, dtype: str = "float32") -> Path:
    moescope("quantize", case.model_dir, "--plan", plan_path, "--out", out, "--dtype", dtype, "--overwrite")
    return out


def sabotaged(plan: BitPlan, layer: int, work: Path) -> Path:
    """The plan with `layer` at another width: a reference the runtime's weights must NOT match."""
    width = 8 if plan.layers[layer][0] != 8 else 4
    save_bit_plan(replace(plan, layers={**plan.layers, layer: [width] * len(plan.layers[layer])}),
                  work / "sabotaged.json")
    return work / "sabotaged.json"


def heldout_windows(model_dir: Path, count: int = 16, length: int = 256) -> tuple[torch.Tensor, list[str]]:
    """`count` windows of `length` tokens, the start of held-out texts from each domain in turn, and those texts."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir, model_max_length=1 << 30)  # whole texts, no warning
    files = [[row["text"] for row in map(json.loads, path.read_text().splitlines()) if "text" in row]
             for path in sorted((ASSETS / "heldout").glob("*.jsonl"))]  # plain texts (some rows are chats)
    windows, texts = [], []
    for index in range(max(len(f) for f in files)):
        for rows in files:
            if len(windows) < count and index < len(rows):
                ids = tokenizer(rows[index])["input_ids"]
                if len(ids) >= length:
                    windows.append(ids[:length])
                    texts.append(rows[index])
    return torch.tensor(windows), texts


def transformers_model(directory: Path):
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def parameters(model) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


def logits_of(model, windows: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(input_ids=windows[i:i + 4]).logits.float() for i in range(0, len(windows), 4)])


@dataclass
class Served:
    """What a runtime loaded: its weights (dequantised, transformers' parameter names), its logits on the
    windows, how to compare them (judge.roundtrip's compare_weights arguments), a structural check of the
    artefact against a plan and problems whatever the plan (in words), extra logit comparisons and lines
    to print."""

    weights: dict[str, torch.Tensor]
    logits: torch.Tensor | None  # None where the runtime itself cannot run here
    compare: list[dict] = field(default_factory=lambda: [{}])
    structure: Callable[[BitPlan], list[str]] = lambda plan: []
    problems: list[str] = field(default_factory=list)
    logit_checks: list[tuple[str, torch.Tensor, torch.Tensor, dict]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
