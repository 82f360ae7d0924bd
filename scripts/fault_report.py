"""Run the fault suite and print its figures.

    python scripts/fault_report.py [extra pytest arguments, e.g. -k jobs]

Runs every test marked `@pytest.mark.fault("<category>")` (tests/test_faults_*.py, and the security checks
marked `fault("security")`) through pytest with a small plugin that classifies each scenario:

- a bad input or fault (every category but "security" and "kill9") whose assertions held is a clear error;
  a failure tagged `INTERNAL:` is an internal error (an unexpected failure reached the person), `HANG:` or a
  pytest-timeout is a hang, `UNCLEAR:` an error without its path or fix, anything else a failed check;
- a "kill9" scenario counts one kill -9 point tried (its `kill_points` property) and the corrupt visible files
  it found (`corrupt_files`, or a `CORRUPT:` failure);
- a "security" scenario counts as a security check passed or failed.

Exit status 0 only when every scenario passed. docs/reliability.md describes the suite.
"""

from __future__ import annotations

import collections
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600            # per scenario: a hang is reported, not waited for forever


class FaultCounter:
    def __init__(self):
        self.category: dict[str, str] = {}
        self.outcome: dict[str, str] = {}
        self.props: dict[str, dict] = {}

    def pytest_collection_modifyitems(self, items):
        for item in items:
            marker = item.get_closest_marker("fault")
            if marker is not None:
                self.category[item.nodeid] = marker.args[0] if marker.args else "other"

    def pytest_runtest_logreport(self, report):
        if report.nodeid not in self.category:
            return
        self.props.setdefault(report.nodeid, {}).update(dict(report.user_properties))
        if report.when == "call" or report.failed or report.skipped:
            if report.nodeid in self.outcome and self.outcome[report.nodeid] != "passed":
                return                               # keep the first failure (setup/call) of a scenario
            self.outcome[report.nodeid] = _classify(report)


def _classify(report) -> str:
    if report.passed:
        return "passed"
    if report.skipped:
        return "skipped"
    text = str(report.longrepr)
    for tag, name in (("INTERNAL:", "internal"), ("HANG:", "hang"), ("Timeout", "hang"), ("CORRUPT:", "corrupt"),
                      ("UNCLEAR:", "unclear")):
        if tag in text:
            return name
    return "failed"


def figures(counter: FaultCounter) -> dict:
    by = collections.Counter()
    kill_points = corrupt = 0
    per_category = collections.Counter()
    for nodeid, category in counter.category.items():
        outcome = counter.outcome.get(nodeid)
        if outcome is None or outcome == "skipped":
            continue
        per_category[category] += 1
        props = counter.props.get(nodeid, {})
        if category == "security":
            by["security_passed" if outcome == "passed" else "security_failed"] += 1
        elif category == "kill9":
            kill_points += int(props.get("kill_points", 1 if outcome in ("passed", "corrupt") else 0))
            corrupt += int(props.get("corrupt_files", 1 if outcome == "corrupt" else 0))
            by["kill9_failed"] += outcome not in ("passed", "corrupt")
        else:
            by["bad_inputs"] += 1
            by[{"passed": "clear", "internal": "internal", "hang": "hang", "unclear": "unclear"}.get(outcome,
                                                                                               "failed")] += 1
    return {"bad inputs and faults tried": by["bad_inputs"], "clear errors": by["clear"],
            "internal errors": by["internal"], "hangs": by["hang"], "unclear errors": by["unclear"],
            "other failed checks": by["failed"] + by["kill9_failed"], "kill -9 points tried": kill_points,
            "corrupt files found": corrupt, "security checks passed": by["security_passed"],
            "security checks failed": by["security_failed"], "_categories": dict(per_category)}


def fault_files() -> list[str]:
    """The test files that mark scenarios (importing every test module only to deselect it costs a minute)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "mark.fault(" in p.read_text(encoding="utf-8"))


def main(argv: list[str]) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.chdir(ROOT)
    counter = FaultCounter()
    started = time.time()
    code = pytest.main(["-m", "fault", "-q", "-p", "no:cacheprovider", f"--timeout={TIMEOUT_S}", *fault_files(),
                        *argv], plugins=[counter])
    result = figures(counter)
    categories = result.pop("_categories")
    print("\nFault suite figures")
    print("-------------------")
    for name, value in result.items():
        print(f"  {name:<28} {value}")
    print(f"  {'scenarios by category':<28} " + ", ".join(f"{k} {v}" for k, v in sorted(categories.items())))
    print(f"  {'wall time':<28} {time.time() - started:.0f} s")
    return int(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
