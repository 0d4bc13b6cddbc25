"""Train the embedded demo MoE (Qwen3-MoE) on the corpus from scripts/build_corpus.py, on CPU.

    python scripts/train_demo_model.py --minutes 50                 # tokenizer + model -> assets/demo-moe
    python scripts/train_demo_model.py --steps 2900                 # reproduce a run exactly
    python scripts/train_demo_model.py --tiny --minutes 0.5 --out /tmp/m   # micro model (tests)
    python scripts/train_demo_model.py --evaluate moescope/assets/demo-moe   # perplexity + routing table

Why a per-layer balancing loss: the stock Switch auxiliary loss in transformers concatenates the
router logits of all layers and balances the pooled load, which lets single layers keep dead experts.
Here a forward hook on every ``mlp.gate`` keeps that layer's logits and chosen experts, the Switch
loss ``E * sum_e f_e * P_e`` is computed per layer and the mean over layers is added to the LM loss.
The stock loss is off (``output_router_logits=False``, ``router_aux_loss_coef=0``).

Reproducible: one seed drives initialisation and batch sampling; with ``--minutes`` the step count
is fixed from the speed of the first steps and written to the log, and ``--steps N`` replays it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CORPUS = ROOT / "data" / "corpus"
ASSETS = ROOT / "moescope" / "assets"
SEP = "\n\x1e\n"
SPECIALS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Share of training sequences per domain; "multilingual" is split evenly over its languages.
DOMAIN_WEIGHTS = {"code": 0.17, "math": 0.11, "reasoning": 0.11, "agent": 0.11, "general": 0.18,
                  "multilingual": 0.32}
FULL = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            num_experts=32, num_experts_per_tok=4, moe_intermediate_size=64, intermediate_size=256,
            max_position_embeddings=256)
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=32,
            max_position_embeddings=64)


def train_tokenizer(files: list[Path], out: Path, vocab_size: int, sample_chars: int = 1_500_000):
    """Byte-level BPE over an equal-size sample of every training file; saved for AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [f.read_text()[:sample_chars].replace(SEP, "\n\n") for f in files]
    tok.train_from_iterator([t[i:i + 4000] for t in texts for i in range(0, len(t), 4000)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|pad|>", unk_token=None,
                                   model_max_length=FULL["max_position_embeddings"])
    fast.chat_template = CHAT_TEMPLATE
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast


def token_streams(tok, files: list[Path], cache: Path | None,
                  max_chars: int | None = None) -> dict[str, np.ndarray]:
    """Each training file as one uint16 token stream, documents joined by the end-of-text token."""
    streams = {}
    for f in files:
        npy = cache / (f.stem + ".npy") if cache else None
        if npy and npy.exists() and npy.stat().st_mtime > f.stat().st_mtime:
            streams[f.stem] = np.load(npy)
            continue
        docs = f.read_text()[:max_chars].split(SEP)
        ids = tok(docs, add_special_tokens=False)["input_ids"]
        arr = np.fromiter((t for d in ids for t in (*d, tok.eos_token_id)), dtype=np.uint16)
        streams[f.stem] = arr
        if npy:
            npy.parent.mkdir(parents=True, exist_ok=True)
            np.save(npy, arr)
    return streams


def make_config(tok, size: dict):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(vocab_size=len(tok), rms_norm_eps=1e-6, tie_word_embeddings=True,
                          norm_topk_prob=True,
                          router_aux_loss_coef=0.0, output_router_logits=False, decoder_sparse_step=1,
                          mlp_only_layers=[], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, rope_theta=10000.0, **size)


class BalanceHooks:
    """Forward hooks on every router: keep (logits, chosen experts) of the last forward, per layer."""

    def __init__(self, model):
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.handles = [layer.mlp.gate.register_forward_hook(self._hook) for layer in model.model.layers]

    def _hook(self, module, args, output) -> None:
        logits, _scores, indices = output
        self.seen.append((logits, indices))

    def loss(self) -> torch.Tensor:
        """Mean over layers of the Switch balance loss E * sum_e f_e * P_e (1.0 when perfectly even)."""
        losses = []
        for logits, indices in self.seen:
            e = logits.shape[-1]
            probs = torch.softmax(logits.float(), dim=-1).mean(0)
            frac = torch.bincount(indices.flatten(), minlength=e).float() / indices.numel()
            losses.append(e * (frac * probs).sum())
        self.seen.clear()
        return torch.stack(losses).mean()


def sample_batch(streams: dict[str, np.ndarray], weights: dict[str, float], rng: np.random.Generator,
                 batch: int, seq: int) -> torch.Tensor:
    names = list(weights)
    p = np.array([weights[n] for n in names])
    picks = rng.choice(len(names), size=batch, p=p / p.sum())
    rows = []
    for i in picks:
        s = streams[names[i]]
        start = rng.integers(0, len(s) - seq - 1)
        rows.append(s[start:start + seq].astype(np.int64))
    return torch.from_numpy(np.stack(rows))


def stream_weights(names: list[str]) -> dict[str, float]:
    langs = [n for n in names if n.startswith("multilingual-")]
    out = {}
    for n in names:
        d = n.split("-")[0]
        out[n] = DOMAIN_WEIGHTS[d] / (len(langs) if d == "multilingual" else 1)
    return out


def train(args) -> dict:
    from transformers import AutoTokenizer, Qwen3MoeForCausalLM

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    size = TINY if args.tiny else FULL
    out = Path(args.out)
    files = sorted((Path(args.corpus) / "train").glob("*.txt"))
    if not files:
        raise SystemExit(f"no training files in {args.corpus}/train: run scripts/build_corpus.py first")
    if args.tiny:
        tok = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else None
        if tok is None:
            tok = train_tokenizer(files, out, vocab_size=args.vocab, sample_chars=50_000)
        cache = None
    else:
        tok = train_tokenizer(files, out, vocab_size=args.vocab)
        cache = ROOT / "data" / "tokens"
    t0 = time.time()
    streams = token_streams(tok, files, cache, max_chars=200_000 if args.tiny else None)
    weights = stream_weights(list(streams))
    log(args, f"tokens per stream: { {k: len(v) for k, v in streams.items()} } ({time.time() - t0:.0f}s)")

    config = make_config(tok, size)
    model = Qwen3MoeForCausalLM(config)
    model.train()
    hooks = BalanceHooks(model)
    nparams = sum(p.numel() for p in model.parameters())
    log(args, f"config {json.dumps(size)} params {nparams:,}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(args.seed)
    seq = size["max_position_embeddings"]
    steps, warmup = args.steps, 50 if args.tiny else 200
    history, t_start, tokens = [], time.time(), 0
    step, stop = 0, []
    signal.signal(signal.SIGUSR1, lambda *_: stop.append("SIGUSR1"))  # kill -USR1 PID: save now and exit
    while True:
        if args.max_minutes and time.time() - t_start > args.max_minutes * 60:
            stop.append(f"--max-minutes {args.max_minutes}")
        if stop:
            log(args, f"stopping early at step {step} of {steps}: {stop[0]}")
            break
        if steps is None and step == 20:  # fix the step count from the measured speed, then log it
            per_step = (time.time() - t_start) / 20
            steps = max(21, int(args.minutes * 60 / per_step))
            log(args, f"--minutes {args.minutes}: {per_step:.3f}s/step -> --steps {steps}")
        if steps is not None and step >= steps:
            break
        total = steps or 10**9
        frac = step / total
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = sample_batch(streams, weights, rng, args.batch, seq)
        out_ = model(input_ids=batch, labels=batch)  # the model shifts labels itself
        balance = hooks.loss()
        loss = out_.loss + args.balance * balance
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += batch.numel()
        history.append(out_.loss.item())
        if step % args.log_every == 0 or step == total - 1:
            el = time.time() - t_start
            log(args, f"step {step} lm {out_.loss.item():.4f} balance {balance.item():.4f} lr {lr:.2e} "
                      f"tok/s {tokens / el:.0f} elapsed {el:.0f}s")
        step += 1
    elapsed = time.time() - t_start
    for h in hooks.handles:
        h.remove()
    model.eval()
    model.config.use_cache = True
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    upstream_config_keys(out / "config.json")
    tok.save_pretrained(out)
    summary = {"steps": step, "tokens": tokens, "seconds": round(elapsed),
               "tokens_per_s": round(tokens / elapsed),
               "first_loss": history[0], "final_loss_train_avg": float(np.mean(history[-20:])),
               "seed": args.seed, "batch": args.batch, "seq_len": seq, "lr": args.lr, "balance": args.balance,
               "params": nparams}
    log(args, "summary " + json.dumps(summary))
    return {"summary": summary, "history": history}


def upstream_config_keys(path: Path) -> None:
    """Write Qwen3-MoE's published key names (`num_experts`, `rope_theta`), which mlx-lm, vLLM and
    llama.cpp's converter read, instead of the names transformers 5 saves (`num_local_experts`,
    `rope_parameters`); transformers loads either."""
    config = json.loads(path.read_text())
    config["num_experts"] = config.pop("num_local_experts", config.get("num_experts"))
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") == "default" and "rope_theta" in rope:
        config.pop("rope_parameters")
        config["rope_theta"] = rope["rope_theta"]
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def log(args, msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    if args.log:
        with open(args.log, "a") as f:
            f.write(line + "\n")


def evaluate(model_dir: str, batch_size: int = 16, max_seqs: int = 128) -> str:
    """Markdown tables: held-out perplexity per domain and language, and routing on calibration.jsonl."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moescope.calibration import HELDOUT
    from moescope.judge.evaluate import Protocol, load_windows
    from moescope.judge.nll import perplexity

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    seq = model.config.max_position_embeddings
    windows = load_windows(HELDOUT, tok, Protocol(seq_len=seq, sequences=max_seqs, seed=42), model)
    rows = ["| domain | lang | sequences | tokens | loss | perplexity |", "|---|---|---:|---:|---:|---:|"]
    by_domain: dict[str, list[float]] = {}
    for (domain, lang), batch in windows.items():
        ppl = perplexity(model, batch, batch_size=batch_size)
        by_domain.setdefault(domain, []).append(math.log(ppl))
        rows.append(f"| {domain} | {lang} | {len(batch)} | {batch.numel()} | {math.log(ppl):.3f} | {ppl:.1f} |")
    rows += ["", "| domain | geometric-mean perplexity over languages |", "|---|---:|"]
    rows += [f"| {d} | {math.exp(sum(v) / len(v)):.1f} |" for d, v in sorted(by_domain.items())]
    losses = [x for v in by_domain.values() for x in v]
    mean = sum(losses) / len(losses)
    rows += ["", f"Held-out loss, mean over the {len(losses)} files: {mean:.3f} nats/token "
             f"(perplexity {math.exp(mean):.1f})."]
    return "\n".join(rows) + "\n\n" + routing_report(model, tok)


def routing_report(model, tok) -> str:
    """Routing on calibration.jsonl, measured by moescope itself (the figures `moescope stats` prints)."""
    from moescope.analysis.analyse import analyse
    from moescope.calibration import load_calibration
    from moescope.profiling.run import ProfileOptions, profile_model
    from moescope.report.text import summary_lines

    with tempfile.TemporaryDirectory() as tmp:
        profile = profile_model(model, tok, load_calibration(ASSETS / "calibration.jsonl"), Path(tmp) / "profile",
                                ProfileOptions(progress=False))
    analysis = analyse(profile)
    lines = summary_lines(analysis) + ["", "| layer | dead | entropy ratio [95 % CI] | Gini | top 10 % / fair share |",
                                       "|---:|---:|---|---:|---:|"]
    for row in analysis.layers:
        low, high = row["entropy_ratio_ci"]
        lines.append(f"| {row['layer']} | {row['dead']} | {row['entropy_ratio']:.3f} [{low:.3f}, {high:.3f}] | "
                     f"{row['gini']:.3f} | {row['top_ratio']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default=str(CORPUS))
    ap.add_argument("--out", default=str(ASSETS / "demo-moe"))
    ap.add_argument("--minutes", type=float, default=50.0, help="wall-time budget when --steps is not given")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="hard wall-clock cap: stop and save even if --steps are not done (logged)")
    ap.add_argument("--tiny", action="store_true", help="micro config for tests (trains in seconds)")
    ap.add_argument("--tokenizer", default=None, help="reuse this tokenizer instead of training one (--tiny)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--balance", type=float, default=0.02, help="weight of the per-layer balance loss")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("TRAIN_THREADS", "2")))
    ap.add_argument("--log", default=None, help="append log lines to this file")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--evaluate", metavar="DEMO_MODEL", help="print perplexity and routing tables")
    args = ap.parse_args(argv)
    if args.evaluate:
        torch.set_num_threads(args.threads)
        print(evaluate(args.evaluate))
        return None
    return train(args)


if __name__ == "__main__":
    main()
