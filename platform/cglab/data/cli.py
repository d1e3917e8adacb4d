"""`cglab corpus build` and `cglab data inspect`. Heavy imports stay inside the handlers."""

from __future__ import annotations

import argparse
import contextlib
import json
from typing import Iterator

from cglab import raylocal
from cglab.config import ConfigError, FilterConfig, SourceConfig, load_config
from cglab.data.corpus import build_corpus, build_package_corpus, train_corpus_tokenizer
from cglab.data.inspect import inspect_sources
from cglab.data.readers import resolve_files


def _corpus_build(args) -> int:
    if args.source == "packages":
        split = lambda x: [p for p in x.split(",") if p] if x else None
        summary = build_package_corpus(
            args.out,
            split(args.packages),
            heldout=split(args.heldout_packages),
            code_bytes=int(args.code_mb * (1 << 20)),
            nl_chars=int(args.nl_mb * (1 << 20)),
            shards=args.shards,
        )
    else:
        summary = build_corpus(args.out, shards=args.shards)
    if args.tokenizer:
        tok = train_corpus_tokenizer(args.out, f"{args.out}/tokenizer", vocab_size=args.vocab_size)
        summary["tokenizer"] = dict(path=f"{args.out}/tokenizer", vocab_size=tok.vocab_size)
    print(json.dumps(summary, indent=1))
    return 0


def _sources_from_args(args):
    """SOURCE arguments -> SourceConfigs: a config file's data.sources, or `[kind:]path` (kind from the suffix)."""
    out = []
    for i, item in enumerate(args.sources):
        if item.endswith((".yaml", ".yml")):
            out += load_config(item).data.sources
            continue
        kind, _, path = item.partition(":") if item.split(":", 1)[0] in ("pile", "stack") else ("", "", item)
        if not kind:
            p = path.rstrip("/")
            kind = (
                "stack"
                if p.endswith(".parquet") or p.endswith("stack")
                else ("pile" if ".json" in p or p.endswith("pile") else "")
            )
        if not kind:
            raise ConfigError(f"SOURCE[{i}] {item!r}: cannot tell pile from stack; write pile:PATH or stack:PATH")
        subsets = args.subsets.split(",") if args.subsets else None
        out.append(SourceConfig(name=f"{kind}{i}:{path}", kind=kind, paths=[path], subsets=subsets))
    return out


@contextlib.contextmanager
def _ray(args) -> Iterator[None]:
    """Ray for one data command, Ray Data progress bars off: the cluster at --address, else a private local one
    of --num-cpus CPUs; one already running in this process is used as it is (and left running)."""
    import ray  # Ray: kept off `cglab --help`'s path
    from ray.data import DataContext

    started = not ray.is_initialized()
    if started and args.address:
        ray.init(address=args.address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    elif started:
        raylocal.start_local(args.num_cpus, configure_logging=False)
    try:
        DataContext.get_current().enable_progress_bars = False
        yield
    finally:
        if started:
            raylocal.shutdown()


def _data_inspect(args) -> int:
    fcfg = load_config(args.config).data.filters if args.config else FilterConfig()
    sources = resolve_files(_sources_from_args(args), field="SOURCE")  # fails before Ray starts
    with _ray(args):
        report = inspect_sources(
            sources,
            fcfg,
            dedup=fcfg.dedup and not args.no_dedup,
            decontaminate=fcfg.decontaminate.enabled and not args.no_decontaminate,
        )
    print(json.dumps(report, indent=1))
    return 0


def _corpus_prepare(args) -> int:
    """Build (or find) the corpus's drop list (dedup, decontamination) and tokenizer under data.cache_path, ahead
    of a sweep."""
    from cglab.data.pipeline import prepare_data  # pyarrow: kept off `cglab --help`'s path

    cfg = load_config(args.config, args.overrides)
    with _ray(args):
        plan = prepare_data(cfg)
    print(json.dumps({"cache_path": cfg.data.cache_path or "(default)", **plan.artifacts}, indent=1))
    return 0


def _data_stream(args) -> int:
    """What a run will read, sample by sample (cglab.data.stream)."""
    from cglab.data import stream  # pyarrow, Ray: kept off `cglab --help`'s path
    from cglab.data.pipeline import prepare_data

    cfg = load_config(args.config, args.overrides)
    with _ray(args):
        report = stream.stream_samples(cfg, prepare_data(cfg), args.samples, rank=args.rank, epoch=args.epoch)
    print(json.dumps(report, indent=1) if args.json else stream.text(report))
    return 0


def register(subparsers) -> None:
    corpus = subparsers.add_parser("corpus", help="the embedded micro corpus")
    csub = corpus.add_subparsers(dest="corpus_command", required=True)
    b = csub.add_parser("build", help="write a micro Pile (jsonl.zst) and micro Stack (parquet) from this Python")
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--shards", type=int, default=4)
    b.add_argument(
        "--source",
        choices=("micro", "packages"),
        default="micro",
        help="micro: a few MB from the standard library (the demo's default); packages: the installed "
        "distributions' code and docs, held out by package (the last shard)",
    )
    b.add_argument("--packages", default=None, help="packages source: comma-separated names (default: all)")
    b.add_argument(
        "--heldout-packages",
        default=None,
        help="packages source: comma-separated held-out names (default: ~10%% chosen by name hash)",
    )
    b.add_argument("--code-mb", type=float, default=200.0, help="packages source: code budget (MiB)")
    b.add_argument("--nl-mb", type=float, default=50.0, help="packages source: NL budget (MiB of characters)")
    b.add_argument("--tokenizer", action="store_true", help="also train a byte-level BPE into OUT/tokenizer")
    b.add_argument("--vocab-size", type=int, default=1024)
    b.set_defaults(func=_corpus_build)
    pr = csub.add_parser(
        "prepare",
        help="build the config's drop list (dedup, decontamination) and tokenizer once, under "
        "data.cache_path, for every later run and trial to reuse",
    )
    pr.add_argument("config")
    pr.add_argument("overrides", nargs="*", metavar="key=value")
    pr.add_argument("--address", help="Ray cluster address (default: a private local one)")
    pr.add_argument("--num-cpus", type=int, default=2)
    pr.set_defaults(func=_corpus_prepare)

    data = subparsers.add_parser("data", help="inspect training data")
    dsub = data.add_subparsers(dest="data_command", required=True)
    i = dsub.add_parser(
        "inspect",
        help="read sources through the training readers/filters/dedup/decontamination; print JSON counts",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="SOURCE: a config YAML (its data.sources), or [pile:|stack:]PATH (file, dir, glob, URL)",
    )
    i.add_argument("sources", nargs="+", metavar="SOURCE")
    i.add_argument("--config", help="take data.filters (decontaminate included) from this config")
    i.add_argument("--subsets", help="comma-separated pile_set_name / lang values to keep")
    i.add_argument("--no-dedup", action="store_true")
    i.add_argument(
        "--no-decontaminate",
        action="store_true",
        help="do not count documents sharing an n-gram with the evaluation sets (data.filters.decontaminate)",
    )
    i.add_argument("--address", help="Ray cluster address (default: a private local one)")
    i.add_argument("--num-cpus", type=int, default=2)
    i.set_defaults(func=_data_inspect)
    st = dsub.add_parser(
        "stream",
        help="what a run will read, sample by sample (source, file, documents, epoch, tokens), and a summary",
    )
    st.add_argument("config")
    st.add_argument("overrides", nargs="*", metavar="key=value")
    st.add_argument("--samples", type=int, default=32)
    st.add_argument("--rank", type=int, default=0, help="DP rank of parallel.data_parallel_size (default 0)")
    st.add_argument("--epoch", type=int, default=0)
    st.add_argument("--json", action="store_true")
    st.add_argument("--address", help="Ray cluster address (default: a private local one)")
    st.add_argument("--num-cpus", type=int, default=2)
    st.set_defaults(func=_data_stream)
