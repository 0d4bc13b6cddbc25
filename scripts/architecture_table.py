"""Regenerate the README's architecture table from a real run of tests/test_capture.py.

    python scripts/architecture_table.py   # runs the capture tests, rewrites README.md between markers

Each row is one tiny random model from moescope.models.tiny: its router family, whether top-k weights are
renormalised, whether it has a shared expert, and the outcome of the two per-architecture tests
(captured routing rebuilds every MoE layer's output; the family re-derives the selection).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- architectures:start -->", "<!-- architectures:end -->"
TESTS = {
    "test_captured_routing_reproduces_each_moe_layer_output": "capture exact",
    "test_router_family_reproduces_the_selection": "family re-derives choice",
}


def test_outcomes() -> dict[tuple[str, str], str]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_capture.py", f"--junitxml={report}",
                        "-k", " or ".join(TESTS)], cwd=ROOT, check=False, capture_output=True)
        outcomes = {}
        for case in ET.parse(report).getroot().iter("testcase"):
            match = re.match(r"(\w+)\[(.+)\]", case.get("name", ""))
            if not match or match.group(1) not in TESTS:
                continue
            status = "pass"
            if case.find("failure") is not None or case.find("error") is not None:
                status = "FAIL"
            elif case.find("skipped") is not None:
                status = "n/a (family other)"
            outcomes[(match.group(1), match.group(2))] = status
    return outcomes


def table() -> str:
    from moescope.models.registry import find_moe_layers
    from moescope.models.tiny import TINY, tiny_model

    outcomes = test_outcomes()
    lines = ["| model_type | router family | top-k renormalised | shared expert | " + " | ".join(TESTS.values()) + " |",
             "|---" * (4 + len(TESTS)) + "|"]
    for model_type in sorted(TINY):
        layer = find_moe_layers(tiny_model(model_type))[0]
        results = [outcomes.get((test, model_type), "not run") for test in TESTS]
        lines.append(f"| {model_type} | {layer.family.name} | {'yes' if layer.renormalize else 'no'} | "
                     f"{'yes' if layer.shared_expert else 'no'} | " + " | ".join(results) + " |")
    return "\n".join(lines)


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        sys.exit(f"README.md lacks the {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{table()}\n{END}{tail}")
    print("README.md architecture table updated")


if __name__ == "__main__":
    main()
