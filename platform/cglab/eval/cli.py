"""`cglab eval ...`: score HumanEval samples, or run the eval suites on a checkpoint. torch and transformers are
imported only by the commands that load a model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cglab.eval import humaneval, mbpp, mtpb, nl
from cglab.eval.generate import load_generator
from cglab.eval.sandbox import Limits, isolation_mode

SUITES = ("humaneval", "infill", "nl", "mbpp", "mtpb")
DATA_SUITES = ("mbpp", "mtpb")  # read from --data-dir: DIR/mbpp.jsonl, DIR/mtpb.jsonl (the published names)
SUBSET_HELP = "the MTPB file is a deliberate subset: do not require the published 115 problems"


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate: HumanEval pass@k, HumanEval-Infill, MBPP, MTPB, NL metrics")
    sub = p.add_subparsers(dest="eval_command", required=True)

    h = sub.add_parser("humaneval", help="score a samples JSONL ({task_id, completion} per line) in the sandbox")
    h.add_argument("--samples", required=True, help="JSONL of {task_id, completion}")
    h.add_argument("--out", help="also write the result JSON here")
    h.add_argument("--timeout", type=float, default=10.0, help="seconds per program (default 10)")
    h.add_argument("--workers", type=int, default=None, help="parallel sandboxes (default: CPU count)")
    h.add_argument("--no-truncate", action="store_true", help="do not cut completions at the stop sequences")
    h.set_defaults(func=_humaneval)

    r = sub.add_parser("run", help="run eval suites on a checkpoint or HF model dir")
    r.add_argument("--checkpoint", required=True, help="HF CodeGen model dir, or a cglab checkpoint")
    r.add_argument("--suite", default="humaneval,infill,nl", help=f"comma list of {','.join(SUITES)}")
    r.add_argument("--limit", type=int, default=None, help="only the first N tasks / documents")
    r.add_argument("--n-samples", type=int, default=1, help="samples per HumanEval / infill task")
    r.add_argument(
        "--temperature", default=None, help="comma list, e.g. 0.2,0.6,0.8 (default: greedy if n-samples is 1, else 0.2)"
    )
    r.add_argument("--top-p", type=float, default=0.95)
    r.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="tokens per completion (default 128; MBPP 512; MTPB each problem's max_gen_length per turn)",
    )
    r.add_argument("--infill-modes", default="single,multi", help="comma list of single,multi")
    r.add_argument(
        "--data-dir",
        help="directory with mbpp.jsonl / mtpb.jsonl, the published files (needed for "
        "--suite mbpp / mtpb; neither can be downloaded by cglab)",
    )
    r.add_argument("--mtpb-subset", action="store_true", help=SUBSET_HELP)
    r.add_argument("--nl-file", help="held-out NL documents (.jsonl with text, or .txt)")
    r.add_argument("--code-file", help="held-out code documents (.jsonl with text/content, or .txt)")
    r.add_argument("--batch-size", type=int, default=16)
    r.add_argument("--device", default=None)
    r.add_argument("--timeout", type=float, default=10.0, help="sandbox seconds per program")
    r.add_argument("--out", help="also write the result JSON here")
    r.set_defaults(func=_run)

    for name, what in (("mbpp", "{task_id, completion}"), ("mtpb", "{id, case, program}")):
        b = sub.add_parser(name, help=f"score a {name.upper()} samples JSONL ({what} per line) in the sandbox")
        b.add_argument("--samples", required=True, help=f"JSONL of {what}")
        b.add_argument("--data-dir", required=True, help=f"directory with {name}.jsonl (the published file)")
        b.add_argument("--out", help="also write the result JSON here")
        b.add_argument("--timeout", type=float, default=10.0, help="seconds per program (default 10)")
        b.add_argument("--workers", type=int, default=None, help="parallel sandboxes (default: CPU count)")
        if name == "mtpb":
            b.add_argument("--mtpb-subset", action="store_true", help=SUBSET_HELP)
        b.set_defaults(func=_score_samples, suite=name)

    s = sub.add_parser("sandbox-info", help="print which isolation the sandbox gets on this machine")
    s.set_defaults(func=_sandbox_info)


def _emit(result: dict, out: str | None) -> None:
    text = json.dumps(result, indent=2)
    if out:
        with open(out, "w") as f:
            f.write(text)
    print(text)


def _humaneval(args) -> int:
    try:
        result = humaneval.evaluate_samples(
            args.samples, limits=Limits(timeout_s=args.timeout), workers=args.workers, do_truncate=not args.no_truncate
        )
    except (OSError, ValueError) as err:
        print(f"cglab eval humaneval: {err}", file=sys.stderr)
        return 2
    _emit(result, args.out)
    return 0


def data_file(data_dir: str | None, suite: str) -> Path:
    """DIR/<suite>.jsonl; a clear error naming the expected file when it is not there."""
    module = {"mbpp": mbpp, "mtpb": mtpb}[suite]
    source = {"mbpp": "google-research/mbpp/", "mtpb": "salesforce/CodeGen benchmark/"}[suite] + module.FILE_NAME
    if not data_dir:
        raise ValueError(f"--suite {suite} needs --data-dir DIR holding {module.FILE_NAME} ({source})")
    path = Path(data_dir) / module.FILE_NAME
    if not path.is_file():
        raise ValueError(
            f"--data-dir {data_dir}: expected {path} ({suite.upper()}'s published file, {source}); it is not there"
        )
    return path


def _score_samples(args) -> int:
    try:
        path = data_file(args.data_dir, args.suite)
        kw = dict(limits=Limits(timeout_s=args.timeout), workers=args.workers)
        if args.suite == "mbpp":
            result = mbpp.evaluate(mbpp.read_samples(args.samples), mbpp.load_tasks(path), **kw)
        else:
            problems = mtpb.load_problems(path, subset=args.mtpb_subset)
            result = mtpb.evaluate(mtpb.read_samples(args.samples), problems, **kw)
    except (OSError, ValueError) as err:
        print(f"cglab eval {args.suite}: {err}", file=sys.stderr)
        return 2
    _emit(result, args.out)
    return 0


def _parse_list(value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise ValueError(f"{flag}: unknown {bad or value!r}; choose from {','.join(allowed)}")
    return items


def _run(args) -> int:
    try:
        suites = _parse_list(args.suite, SUITES, "--suite")
        modes = _parse_list(args.infill_modes, ("single", "multi"), "--infill-modes")
        temps = (
            [float(t) for t in args.temperature.split(",")]
            if args.temperature
            else [0.0 if args.n_samples == 1 else 0.2]
        )
        # Check the data files before the (slow) model load: a missing or malformed file fails at once.
        data = {s: data_file(args.data_dir, s) for s in suites if s in DATA_SUITES}
        if "mbpp" in data:
            mbpp.fewshot(mbpp.load_tasks(data["mbpp"]), data["mbpp"])
        if "mtpb" in data:
            mtpb.load_problems(data["mtpb"], subset=args.mtpb_subset)
    except (OSError, ValueError) as err:
        print(f"cglab eval run: {err}", file=sys.stderr)
        return 2
    from cglab.eval import infill  # torch: kept off the sandbox-only commands

    try:
        gen = load_generator(args.checkpoint, batch_size=args.batch_size, device=args.device)
    except (OSError, ValueError) as err:
        print(f"cglab eval run: {err}", file=sys.stderr)
        return 2
    limits = Limits(timeout_s=args.timeout)
    gen_kw = dict(n=args.n_samples, top_p=args.top_p, max_new_tokens=args.max_new_tokens or 128)
    result: dict = {"checkpoint": args.checkpoint}
    if "humaneval" in suites:
        problems = dict(list(humaneval.load_problems().items())[: args.limit])
        by_temp = {}
        for t in temps:
            samples = humaneval.generate_samples(gen, problems, temperature=t, **gen_kw)
            by_temp[str(t)] = humaneval.evaluate(samples, problems, limits=limits)
        result["humaneval"] = {"by_temperature": by_temp, "best": _best_per_k(by_temp)}
    if "infill" in suites:
        result["infill"] = {
            m: infill.evaluate(gen, m, limit=args.limit, temperature=temps[0], limits=limits, **gen_kw) for m in modes
        }
    for suite in DATA_SUITES:
        if suite in suites:
            module = {"mbpp": mbpp, "mtpb": mtpb}[suite]
            # MBPP's solutions are whole functions (512 tokens); MTPB's budget is per turn, per problem.
            budget = args.max_new_tokens or (512 if suite == "mbpp" else None)
            extra = {"subset": args.mtpb_subset} if suite == "mtpb" else {}
            by_temp = {
                str(t): module.run(
                    gen,
                    data[suite],
                    limit=args.limit,
                    temperature=t,
                    n=args.n_samples,
                    top_p=args.top_p,
                    max_new_tokens=budget,
                    limits=limits,
                    **extra,
                )
                for t in temps
            }
            result[suite] = {"data": str(data[suite]), "by_temperature": by_temp, "best": _best_per_k(by_temp)}
    if "nl" in suites:
        fallback = nl.builtin_texts(args.limit or 64) if not (args.nl_file and args.code_file) else {}
        nl_texts = nl.read_texts(args.nl_file, args.limit) if args.nl_file else fallback["nl"]
        code_texts = nl.read_texts(args.code_file, args.limit) if args.code_file else fallback["code"]
        result["nl"] = nl.evaluate(gen, nl_texts, code_texts)
        result["nl"]["source"] = {
            "nl": args.nl_file or "builtin (stdlib docstrings; not held out)",
            "code": args.code_file or "builtin (HumanEval solutions)",
        }
    _emit(result, args.out)
    return 0


def _best_per_k(by_temp: dict[str, dict]) -> dict[str, dict]:
    """The CodeGen papers' convention: for each k, the best temperature (with that run's sandbox conditions,
    so a headline number never travels without them)."""
    best: dict[str, dict] = {}
    for t, res in by_temp.items():
        for key, val in res.items():
            if key.startswith("pass@") and (key not in best or val > best[key]["value"]):
                best[key] = {
                    "value": val,
                    "temperature": float(t),
                    "isolation": res.get("isolation"),
                    "statuses": res.get("statuses"),
                }
    return best


def _sandbox_info(args) -> int:
    print(json.dumps({"isolation": isolation_mode()}))
    return 0


def main(argv: list[str] | None = None) -> int:  # `python -m cglab.eval.cli ...` without the top-level CLI
    parser = argparse.ArgumentParser(prog="cglab")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
