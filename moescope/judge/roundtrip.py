"""Does a runtime serve the plan? What a runtime loaded from an export (its weights, dequantised and named
as the transformers model names its parameters, and its logits) against moescope's fake-quantised
model of the same coarsened plan (`moescope quantize --plan coarse.json`).

Weights are compared exactly where the runtime rounds as moescope does (compressed-tensors through
transformers, MLX in float32): every value identical. Where it rounds its own way (llama.cpp's
fixed blocks and fitted scales) they are compared by error: each tensor's squared error against the
original may be at most `max_error_ratio` times the plan's. Either way a tensor the runtime did not
load, or loaded with another shape, fails. `RoundTrip.verdict()` raises with every failing tensor
named, so a check built on it cannot pass quietly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moescope.errors import MoescopeError
from moescope.judge.nll import logits_nll, nll_perplexity, token_kl, top1_matches


class RoundTripFailed(MoescopeError):
    """The runtime's weights or logits are not the plan's."""


@dataclass
class TensorReport:
    name: str
    total: int
    identical: int = 0
    max_diff: float = 0.0
    error_ratio: float | None = None  # squared error against the original, over the plan's
    problem: str | None = None  # why it fails; None when it passes


@dataclass
class LogitReport:
    """Candidate against baseline on the same tokens: largest logit difference, mean KL(baseline ||
    candidate) per position and top-1 agreement."""

    max_diff: float
    kl: float
    top1: float

    def describe(self) -> str:
        return f"max |diff| {self.max_diff:.3g}, KL {self.kl:.3g}, top-1 agreement {self.top1:.3f}"


def compare_tensor(name: str, loaded: torch.Tensor | None, reference: torch.Tensor,
                   original: torch.Tensor | None, max_error_ratio: float | None) -> TensorReport:
    """One tensor: identical values (max_error_ratio None) or an error within max_error_ratio of the plan's."""
    report = TensorReport(name, reference.numel())
    if loaded is None:
        report.problem = "not loaded by the runtime"
        return report
    if tuple(loaded.shape) != tuple(reference.shape):
        report.problem = f"loaded with shape {tuple(loaded.shape)}, the plan's is {tuple(reference.shape)}"
        return report
    loaded, reference = loaded.detach().float(), reference.detach().float()
    report.identical = int((loaded == reference).sum())
    report.max_diff = float((loaded - reference).abs().max()) if reference.numel() else 0.0
    if max_error_ratio is None:
        if report.identical != report.total:
            report.problem = (f"{report.total - report.identical} of {report.total} values differ from the plan's "
                              f"(max |diff| {report.max_diff:.3g})")
        return report
    if original is None:
        raise ValueError(f"{name}: comparing by error needs the original weights")
    original = original.detach().float()
    runtime_error = float(((loaded - original) ** 2).sum())
    plan_error = float(((reference - original) ** 2).sum())
    report.error_ratio = runtime_error / plan_error if plan_error > 0 else (0.0 if runtime_error == 0 else float("inf"))
    if report.error_ratio > max_error_ratio:
        report.problem = (f"squared error {runtime_error:.4g} against the original is {report.error_ratio:.3g} times "
                          f"the plan's {plan_error:.4g} (at most {max_error_ratio} allowed)")
    return report


def compare_logits(candidate: torch.Tensor, baseline: torch.Tensor) -> LogitReport:
    """Logits [..., vocab] of the same tokens."""
    cand = torch.log_softmax(candidate.double(), -1)
    base = torch.log_softmax(baseline.double(), -1)
    return LogitReport(float((candidate.double() - baseline.double()).abs().max()), float(token_kl(base, cand).mean()),
                       float(top1_matches(base, cand).double().mean()))


def logits_perplexity(logits: torch.Tensor, windows: torch.Tensor) -> float:
    """Perplexity of `windows` [n, seq_len] scored from their logits [n, seq_len, vocab]."""
    return nll_perplexity(logits_nll(logits, windows), windows)


@dataclass
class RoundTrip:
    """Everything one check compared; `verdict()` raises if anything is not the plan's."""

    what: str
    tensors: list[TensorReport] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def compare_weights(self, loaded: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                        names: list[str] | None = None, original: dict[str, torch.Tensor] | None = None,
                        max_error_ratio: float | None = None) -> list[TensorReport]:
        """Compare `names` (default: every reference tensor) and keep the reports."""
        reports = [compare_tensor(name, loaded.get(name), reference[name],
                                  None if original is None else original[name], max_error_ratio)
                   for name in (names if names is not None else sorted(reference))]
        self.tensors += reports
        return reports

    def check_logits(self, what: str, report: LogitReport, max_kl: float | None = None,
                     max_diff: float | None = None) -> str:
        """Record logits that disagree beyond the bounds given; returns the line to print."""
        if (max_kl is not None and report.kl > max_kl) or (max_diff is not None and report.max_diff > max_diff):
            bound = f"KL at most {max_kl}" if max_kl is not None else f"max |diff| at most {max_diff}"
            self.problems.append(f"logits, {what}: {report.describe()} ({bound} allowed)")
        return f"logits, {what}: {report.describe()}"

    def failures(self) -> list[str]:
        return [f"{t.name}: {t.problem}" for t in self.tensors if t.problem] + self.problems

    def summary(self) -> str:
        exact = [t for t in self.tensors if t.error_ratio is None]
        passed = len(self.tensors) - sum(bool(t.problem) for t in self.tensors)
        line = f"{self.what}: {passed} of {len(self.tensors)} tensors as planned"
        if exact:
            line += f" ({sum(t.identical for t in exact)} of {sum(t.total for t in exact)} values identical"
            line += ")" if len(exact) == len(self.tensors) else ", the rest compared by error)"
        ratios = [t.error_ratio for t in self.tensors if t.error_ratio is not None]
        if ratios:
            line += f"; squared error {min(ratios):.3g}-{max(ratios):.3g} times the plan's"
        return line

    def verdict(self) -> str:
        """The summary line; RoundTripFailed naming every failure if there is one."""
        problems = self.failures()
        if problems:
            shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
            raise RoundTripFailed(f"ROUND TRIP FAILED, {self.what}: {len(problems)} problems\n  " + "\n  ".join(shown))
        return self.summary()
