"""Write docs/findings.md from a demo run's findings.json (the same table that opens its index.html).

    moescope demo --out runs/demo && python scripts/findings_doc.py runs/demo

tests/test_demo.py fails when the committed docs/findings.md and a fresh run disagree in structure (its
headings, each finding's claim and rule, the plan names), so rerun both after changing a finding.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moescope.output import write_atomic
from moescope.report.findings_page import findings_markdown

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a `moescope demo --out` directory")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "findings.md")
    args = parser.parse_args()
    data = json.loads((args.run / "findings.json").read_text())
    write_atomic(args.out, findings_markdown(data))
    print(f"wrote {args.out} from {args.run / 'findings.json'}")


if __name__ == "__main__":
    main()
