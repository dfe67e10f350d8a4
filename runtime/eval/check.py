"""`python -m runtime.eval.check --model ART`: the runtime checks itself against the artifact's golden vectors.

In:  an artifact directory with golden.json (written at export from the eager model).
Out: per case, teacher-forced top-1 agreement and the largest logit difference on the recorded top
     ids; exit 0 when every check holds (float32: every argmax equal and logits within tolerance;
     float16/bfloat16: agreement >= 99% and logits within their tolerance), else 1; an error is one
     `error:` line with its kind's status (2 usage, 3 a bad artifact, 1 a failed step). `--json` prints
     the figures as one object. Every driver in drivers/ runs the same check.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from runtime.core.contract import ArtifactError, read_json_file
from runtime.core.errors import run_cli
from runtime.core.step import KVCache, decode_loop
from runtime.generate.api import Generator, load
from runtime.core.session import PROVIDERS



def check_case(gen: Generator, case: dict, golden: dict) -> dict:
    """Feed the golden ids teacher-forced; count argmax agreement, measure top-logit differences."""
    greedy, top = np.array(case["greedy_ids"]), case["top_logits"]
    step, agree, worst = 0, 0, 0.0

    def pick(logits: np.ndarray, cache: KVCache) -> tuple[np.ndarray, bool]:
        nonlocal step, agree, worst
        agree += int((logits.argmax(-1) == greedy[:, step]).sum())
        if step < golden["top_logits_steps"]:
            for row, pairs in enumerate(top):
                worst = max(worst, max(abs(float(logits[row, i]) - v) for i, v in pairs[step]))
        step += 1
        return greedy[:, step - 1].astype(np.int64), step == golden["steps"]

    decode_loop(gen.model, case["prompt_ids"], pick, pad_id=gen.pad_id)
    return {"name": case["name"], "rows": len(greedy), "agreement": agree / greedy.size,
            "max_abs_logit_diff": worst}


def check(gen: Generator, golden: dict) -> dict:
    cases = [check_case(gen, case, golden) for case in golden["cases"]]
    agreement = sum(c["agreement"] * c["rows"] for c in cases) / sum(c["rows"] for c in cases)
    worst = max(c["max_abs_logit_diff"] for c in cases)
    floor = golden["min_agreement"]  # the artifact's own floor (what its verification demanded or measured)
    passed = worst <= golden["tolerance"] and (agreement == 1.0 if golden["exact"] else agreement >= floor)
    return {"passed": passed, "agreement": agreement, "max_abs_logit_diff": worst,
            "tolerance": golden["tolerance"], "exact": golden["exact"], "min_agreement": floor, "cases": cases}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.eval.check", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="artifact directory")
    ap.add_argument("--provider", choices=["auto", *PROVIDERS], default="auto")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = ap.parse_args(argv)
    return run_cli(lambda: report(args))


def report(args: argparse.Namespace) -> int:
    """Check the artifact named by the flags and print the figures; 0 when every check holds, else 1."""
    gen = load(args.model, args.provider)
    golden = read_json_file(gen.directory, gen.manifest, "golden")
    if not golden:
        raise ArtifactError(f"{args.model} has no golden vectors (exported with --no-verify, or its "
                            "verification is pending); re-export with verification on")
    if "min_agreement" not in golden:  # golden.json version 1 (older exports) left the floor to each driver
        raise ArtifactError(f"{args.model}'s golden.json (version {golden.get('version')}) records no min_agreement; "
                            "re-verify the artifact to rewrite it (python -m ernie_export.artifact.verify)")
    result = check(gen, golden)
    if args.json:
        print(json.dumps(result))
    else:
        for c in result["cases"]:
            print(f"{c['name']:>18}: {c['rows']} row(s), top-1 agreement {c['agreement']:.2%}, "
                  f"max |logit diff| {c['max_abs_logit_diff']:.2e}")
        rule = "exact" if result["exact"] else f"agreement >= {result['min_agreement']:.0%}"
        print(f"golden vectors {'PASSED' if result['passed'] else 'FAILED'} on {gen.provider} "
              f"(tolerance {result['tolerance']:g}, {rule})")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
