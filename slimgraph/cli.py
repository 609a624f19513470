"""The `slimgraph` command: parses arguments and calls the same Python API a user calls."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

import slimgraph
from slimgraph.errors import SlimgraphError

_MODEL_HELP = ("an .onnx file, a Hugging Face model folder, package.module:callable returning a "
               "torch module, or a built-in")


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="slimgraph", description="Make trained models cheaper to run, verified.",
        formatter_class=fmt,
    )
    parser.add_argument("--version", action="version", version=f"slimgraph {slimgraph.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_export_command(sub, fmt)
    _add_inspect_command(sub, fmt)
    _add_bench_command(sub, fmt)
    _add_advise_command(sub, fmt)
    _add_partition_command(sub, fmt)
    _add_run_command(sub, fmt)
    for name, what in (("passes", "the registered passes and recipes"),
                       ("backends", "the backends and whether they run here")):
        p = sub.add_parser(name, help=f"list {what}", formatter_class=fmt)
        p.add_argument("--json", action="store_true", help="print JSON to stdout")
    return parser


def _add_export_command(sub, fmt: type[argparse.HelpFormatter]) -> None:
    from slimgraph.backends import BACKENDS
    from slimgraph.frontend import DEFAULT_MODEL

    exp = sub.add_parser("export", help="export MODEL to a verified artifact directory",
                         formatter_class=fmt)
    exp.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=_MODEL_HELP)
    exp.add_argument("-o", "--out", default="slimgraph-out", help="artifact directory to write")
    spec = exp.add_mutually_exclusive_group()
    spec.add_argument("--passes", metavar="SPEC", help="e.g. fold-constants (see `slimgraph passes`)")
    spec.add_argument("--recipe", metavar="FILE.toml", help="a TOML recipe of [[pass]] tables")
    exp.add_argument("--backend", action="append", metavar="NAME[:opt=v,...]",
                     help=f"repeatable; one of {', '.join(BACKENDS)} (default: ort-cpu)")
    exp.add_argument("--calib", metavar="FILE.npz", help="calibration/verification inputs")
    exp.add_argument("--input", action="append", default=[], metavar="NAME=DxDxD",
                     help="input shape, repeatable")
    exp.add_argument("--train", metavar="FILE.npz",
                     help="training inputs (+ optional `labels`) for heal passes; default: the "
                          "model's own training data, else the calibration set")
    _add_folder_flags(exp)
    exp.add_argument("--force", action="store_true", help="replace OUT if it exists")
    exp.add_argument("--allow-mismatch", action="store_true",
                     help="keep the artifact even if verification exceeds the tolerance")
    exp.add_argument("--pack", action="store_true",
                     help="also write model.onnx.xz, entropy-coded (unpack: xz -dk model.onnx.xz)")
    exp.add_argument("--build-only", action="store_true",
                     help="also build backends that cannot run here (tvm-cuda without a GPU), "
                          "unverified")
    _add_output_flags(exp)


def _add_inspect_command(sub, fmt: type[argparse.HelpFormatter]) -> None:
    from slimgraph.frontend import DEFAULT_MODEL

    ins = sub.add_parser("inspect", help="ops, parameters, bytes and MACs of MODEL",
                         formatter_class=fmt)
    ins.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=_MODEL_HELP)
    ins.add_argument("--input", action="append", default=[], metavar="NAME=DxDxD")
    ins.add_argument("--batch", type=int, default=1, help="batch size that MACs are counted at")
    ins.add_argument("--json", action="store_true", help="print JSON to stdout")
    ins.add_argument("--groups", action="store_true",
                     help="also show the channel groups that prune-channels removes together")
    ins.add_argument("--blocks", action="store_true",
                     help="also show the residual blocks and transformer layers that "
                          "prune-layers can remove")


def _add_bench_command(sub, fmt: type[argparse.HelpFormatter]) -> None:
    from slimgraph.bench import DEFAULT_PEERS
    from slimgraph.frontend import DEFAULT_MODEL

    b = sub.add_parser("bench", help="compare backends and variants of MODEL side by side",
                       formatter_class=fmt)
    b.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=_MODEL_HELP)
    b.add_argument("-o", "--out", default="slimgraph-bench", help="results directory to write")
    b.add_argument("--backends", default="ort-cpu", help="comma-separated backend names")
    b.add_argument("--variants", default="fp32",
                   help="comma-separated: fp32, a recipe name, a RECIPE.toml, or a pass spec "
                        "joined with '+' (e.g. fold-constants+quantize:int8)")
    b.add_argument("--batch", default="1", help="comma-separated batch sizes")
    b.add_argument("--threads", type=int, default=2, help="threads per session")
    b.add_argument("--warmup", type=int, default=5, help="untimed runs per row")
    b.add_argument("--repeat", type=int, default=30, help="timed interleaved rounds")
    b.add_argument("--workers", type=int, default=1, help="concurrent sessions for throughput")
    b.add_argument("--eval", metavar="DATA.npz", help="held-out inputs (+ optional `labels`)")
    b.add_argument("--peers", default=",".join(DEFAULT_PEERS),
                   help="baselines to include (comma-separated; '' for none)")
    b.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    b.add_argument("--force", action="store_true", help="replace OUT if it exists")
    _add_output_flags(b)


def _add_advise_command(sub, fmt: type[argparse.HelpFormatter]) -> None:
    from slimgraph.frontend import DEFAULT_MODEL

    adv = sub.add_parser("advise", help="which device, precision and backend serve MODEL "
                         "cheapest (roofline bounds, calibrated on this CPU)", formatter_class=fmt)
    adv.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=_MODEL_HELP + "; or an artifact")
    adv.add_argument("--batch", type=int, default=1)
    adv.add_argument("--slo-ms", type=float, help="latency objective per batch")
    adv.add_argument("--precisions", default="fp32,fp16,bf16,int8",
                     help="comma-separated, of fp32, fp16, bf16, int8")
    adv.add_argument("--devices", metavar="FILE.toml",
                     help="more devices (same layout as slimgraph/advise/devices.toml)")
    adv.add_argument("--no-measure", action="store_true",
                     help="do not run the model here (every row is then a bound)")
    adv.add_argument("-o", "--out", default="advise", help="directory for advise.json, roofline.png")
    adv.add_argument("--force", action="store_true", help="replace OUT if it exists")
    _add_output_flags(adv)


def _add_partition_command(sub, fmt: type[argparse.HelpFormatter]) -> None:
    part = sub.add_parser("partition", help="cut MODEL into pipeline stages balanced by measured "
                          "time (or weight bytes), each a valid ONNX model", formatter_class=fmt)
    part.add_argument("model", help=_MODEL_HELP + "; or an artifact")
    part.add_argument("--stages", type=int, help="number of stages (default with "
                      "--max-stage-bytes: the fewest that fit)")
    part.add_argument("--balance", default="time", help="time or memory (weight bytes)")
    part.add_argument("--max-stage-bytes", type=int, metavar="B",
                      help="cap on each stage's weight bytes")
    part.add_argument("--batch", type=int, default=16, help="micro-batch size to balance for")
    part.add_argument("--threads", type=int, default=1, help="intra-op threads per stage")
    part.add_argument("--calib", metavar="FILE.npz", help="inputs to profile on")
    part.add_argument("-o", "--out", default="slimgraph-pipeline", help="directory to write")
    part.add_argument("--force", action="store_true", help="replace OUT if it exists")
    _add_output_flags(part)


def _add_run_command(sub, fmt: type[argparse.HelpFormatter]) -> None:
    r = sub.add_parser("run", help="batch inference of an artifact over a dataset: one process, "
                       "Ray replicas (--workers) or a Ray pipeline (a partitioned artifact)",
                       formatter_class=fmt)
    r.add_argument("artifact", help="an export or partition directory, or an .onnx file")
    r.add_argument("--data", required=True, metavar="IN.npz",
                   help="arrays named after the model's inputs, samples on axis 0")
    r.add_argument("-o", "--out", required=True, metavar="OUT.npz", help="outputs, in input order")
    r.add_argument("--batch", type=int, default=16, help="samples per batch (micro-batch)")
    r.add_argument("--workers", type=int, help="data parallel over W Ray actors")
    r.add_argument("--ray", metavar="auto|ADDRESS",
                   help="join an existing Ray cluster (default: start a local one when needed)")
    r.add_argument("--threads", type=int,
                   help="intra-op threads per session (default: each actor's CPU share)")
    r.add_argument("--local", action="store_true",
                   help="run a partitioned artifact's stages in order in this process")
    r.add_argument("--force", action="store_true", help="replace OUT if it exists")
    _add_output_flags(r)


def _add_folder_flags(parser: argparse.ArgumentParser) -> None:
    """Options of a Hugging Face model folder: the task and text files (one text per line)."""
    from slimgraph.frontend.hf_folder import TASKS

    parser.add_argument("--task", choices=TASKS,
                        help="a model folder's task (default: from its config / modules.json)")
    parser.add_argument("--calib-text", metavar="FILE.txt",
                        help="a model folder's calibration texts, tokenised by its tokenizer")
    parser.add_argument("--eval-text", metavar="FILE.txt",
                        help="a model folder's verification texts")
    parser.add_argument("--train-text", metavar="FILE.txt", help="a model folder's texts for heal")


def _texts(args: argparse.Namespace):
    from slimgraph.frontend import TextData

    return TextData(args.calib_text, args.eval_text, args.train_text)


def _add_output_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--quiet", action="store_true", help="print nothing but errors")
    group.add_argument("--json", action="store_true", help="print the result as JSON to stdout")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    err = Console(stderr=True)
    try:
        return {"export": _export, "inspect": _inspect, "bench": _bench, "passes": _passes,
                "backends": _backends, "advise": _advise, "partition": _partition,
                "run": _run}[args.command](args)
    except SlimgraphError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, markup=True,
                  soft_wrap=True, emoji=False)  # escaped: names in the message come from the input
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("interrupted; nothing was written")
        return 130


def _inputs(specs: list[str]) -> dict[str, tuple[int, ...]]:
    from slimgraph.frontend import parse_input_spec

    return dict(parse_input_spec(s) for s in specs)


def _export(args: argparse.Namespace) -> int:
    from slimgraph.passes import Pipeline

    passes = Pipeline.from_recipe(args.recipe) if args.recipe else (
        Pipeline.parse(args.passes) if args.passes else None
    )
    console = Console(stderr=True, quiet=args.quiet or args.json)
    with console.status("starting") as status:
        def on_stage(name: str) -> None:
            status.update(f"[bold]{name}[/] …")
            console.print(f"[dim]•[/] {name}", highlight=False)

        result = slimgraph.export(
            args.model, args.out, passes=passes, backends=args.backend or ["ort-cpu"],
            calibration=args.calib, inputs=_inputs(args.input), force=args.force,
            allow_mismatch=args.allow_mismatch, build_only=args.build_only, train=args.train,
            task=args.task, texts=_texts(args), on_stage=on_stage,
            on_progress=lambda text: status.update(f"[bold]{text}[/]"), pack=args.pack,
        )
    if result.rank:  # a torchrun rank other than 0: it trained, rank 0 writes
        return 0
    if args.json:
        print(json.dumps({"out": str(result.out), "passed": result.passed,
                          "warnings": result.warnings, "timings": result.timings,
                          "manifest": result.manifest}, indent=2))
    elif not args.quiet:
        _print_export(Console(), result)
    return 0 if result.passed else 1


def _print_export(console: Console, result) -> None:
    m = result.manifest
    before, after = m["model"]["before"], m["model"]["after"]
    console.print(f"[bold]{m['source']['name']}[/] → {result.out}  "
                  f"(pipeline: {m['pipeline'] or 'none'})")
    console.print(f"nodes {before['nodes']} → {after['nodes']}, weight bytes "
                  f"{before['weight_bytes']:,} → {after['weight_bytes']:,}")
    if "pack" in m:
        p = m["pack"]
        console.print(f"packed {p['file']}: {p['packed_bytes']:,} bytes (weights "
                      f"{p['packed_weight_bytes']:,}: {p['weight_compression']}x smaller than "
                      f"{p['dense_fp32_weight_bytes']:,} dense fp32); unpack: {p['unpack']}")
    table = Table("backend", "output", "max abs err", "max rel err", "cosine", "top-1", "result")
    for name, entry in m["backends"].items():
        ver = entry["verification"]
        if "skipped" in ver:
            table.add_row(name, "-", "", "", "", "", "[yellow]not run[/]")
            continue
        for o in ver["outputs"]:
            top1 = "-" if o["top1_agreement"] is None else f"{o['top1_agreement']:.4f}"
            table.add_row(name, o["name"], f"{o['max_abs_err']:.3g}", f"{o['max_rel_err']:.3g}",
                          f"{o['cosine']:.6f}", top1,
                          "[green]pass[/]" if ver["passed"] else "[red]FAIL[/]")
    console.print(table)
    for report in m["passes"]:  # a pass's headline note starts with its name (heal's scores)
        for note in report["notes"]:
            if note.startswith(f"{report['name']}: "):
                console.print(note, highlight=False)
    for warning in result.warnings:
        console.print(f"[bold yellow]warning:[/] {warning}", highlight=False)
    console.print("time: " + ", ".join(
        f"{k.removesuffix(' samples_per_s')} {v:.0f} samples/s" if k.endswith("samples_per_s")
        else f"{k} {v:.2f}s" for k, v in result.timings.items()))


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _bench(args: argparse.Namespace) -> int:
    from slimgraph.bench import bench
    from slimgraph.progress import progress_bar

    try:
        batches = [int(b) for b in _split(args.batch)]
    except ValueError as exc:
        raise SlimgraphError(f"--batch {args.batch!r}: expected integers like 1,16") from exc
    # A variant spec uses '+' between passes, since ',' separates the variants themselves.
    variants = [v.replace("+", ",") for v in _split(args.variants)]
    console = Console(stderr=True, quiet=args.quiet or args.json)
    with progress_bar("{task.description}", console=console, time_left=False) as bar:
        task = bar.add_task("load", total=None)

        def on_progress(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total or None)

        result = bench(
            args.model, args.out, backends=_split(args.backends), variants=variants,
            batches=batches, threads=args.threads, warmup=args.warmup, repeat=args.repeat,
            workers=args.workers, eval_data=args.eval, peers=_split(args.peers),
            memory=not args.no_memory, force=args.force, on_progress=on_progress,
        )
    if args.json:
        print(json.dumps(result.to_json(), indent=2, default=str))
    elif not args.quiet:
        _print_bench(Console(), result)
    return 0


def _print_bench(console: Console, result) -> None:
    def fmt(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    table = Table("batch", "variant", "backend", "p50 ms", "vs fp32", "cosine", "task acc",
                  "flags", title=f"{result.model} ({result.machine['cpu']}, "
                                 f"{result.settings['threads']} threads)")
    for r in result.rows:
        name = f"{r.variant} (peer)" if r.peer else r.variant
        if r.status != "ok":
            table.add_row(str(r.batch), name, r.backend, f"[yellow]{r.status}[/]", "", "", "",
                          r.reason or "")
            continue
        ratio = fmt(r.ratio_to_fp32, ".2f") + ("x" if r.ratio_to_fp32 is not None else "")
        table.add_row(str(r.batch), name, r.backend, f"{r.latency.p50_ms:.3f}", ratio,
                      fmt(r.cosine, ".5f"), fmt(r.task_accuracy, ".4f"),
                      f"[red]{'; '.join(r.flags)}[/]" if r.flags else "")
    console.print(table)
    console.print(f"all columns (p90/p99, throughput, build time, bytes, peak memory, errors) in "
                  f"{result.out}/results.md; plots pareto.png, size.png")


def _inspect(args: argparse.Namespace) -> int:
    from slimgraph.model_stats import summarize

    loaded = slimgraph.load(args.model, inputs=_inputs(args.input))
    summary = summarize(loaded.model, batch=args.batch)
    groups = None
    if args.groups:
        from slimgraph.passes.prune.channel_groups import channel_groups, groups_json

        groups = groups_json(channel_groups(loaded.model))
    blocks = None
    if args.blocks:
        from slimgraph.passes.prune.layers import blocks_json

        blocks = blocks_json(loaded.model)
    if args.json:
        extra = {k: v for k, v in (("groups", groups), ("blocks", blocks)) if v is not None}
        print(json.dumps({**summary.to_json(), **extra}, indent=2))
        return 0
    console = Console()
    io = Table("kind", "name", "dtype", "shape", title=f"{loaded.source['name']}")
    for kind, values in (("input", summary.inputs), ("output", summary.outputs)):
        for v in values:
            shape = "?" if v["shape"] is None else "x".join(map(str, v["shape"]))
            io.add_row(kind, v["name"], str(v["dtype"]), shape)
    console.print(io)
    console.print(f"nodes {summary.nodes}, parameters {summary.params:,}, "
                  f"weight bytes {summary.weight_bytes:,}, "
                  f"MACs {summary.total_macs:,} at batch {summary.batch}")
    ops = Table("op", "count", title="op histogram")
    for op, n in summary.ops.items():
        ops.add_row(op, str(n))
    console.print(ops)
    layers = Table("node", "op", "MACs", "share", "weight bytes", "activation bytes r/w",
                   "ops/byte", title="MACs per layer")
    for layer in summary.layers:
        share = layer.macs / summary.total_macs if summary.total_macs else 0.0
        layers.add_row(layer.node, layer.op_type, f"{layer.macs:,}", f"{share:.1%}",
                       f"{layer.weight_bytes:,}", f"{layer.read_bytes:,} / {layer.write_bytes:,}",
                       f"{layer.intensity:.2f}")
    console.print(layers)
    if groups is not None:
        table = Table("group", "layers (coupled output channels)", "units", "prunable",
                      "blocked by", title="channel groups (prune-channels)")
        for i, g in enumerate(groups):
            unit = "heads" if g.get("heads") else "channels"
            table.add_row(str(i), ", ".join(g["layers"]), f"{g['channels']} {unit}",
                          str(g["prunable"]), "; ".join(g["blocked_by"]) or "-")
        console.print(table)
    if blocks is not None:
        table = Table("unit", "kind", "blocks", "nodes", "MACs", "removable",
                      title="residual blocks and layers (prune-layers)")
        for b in blocks:
            table.add_row(b["name"], b["kind"], str(b["blocks"]), str(b["nodes"]),
                          f"{b['macs']:,}", "yes" if b["removable"] else f"no: {b['reason']}")
        if not blocks:
            table.add_row("-", "no residual blocks found", "", "", "", "")
        console.print(table)
    return 0


def _advise(args: argparse.Namespace) -> int:
    from slimgraph.advise import advise, plot_roofline
    from slimgraph.artifact import check_output_path, staged_dir

    out = check_output_path(args.out, force=args.force, kind="output directory")  # before the work
    result = advise(args.model, batch=args.batch, slo_ms=args.slo_ms,
                    precisions=[p.strip() for p in args.precisions.split(",") if p.strip()],
                    devices=args.devices, measure=not args.no_measure)
    text = result.dumps()
    with staged_dir(out, force=args.force) as tmp:
        (tmp / "advise.json").write_text(text)
        plot = plot_roofline(result, tmp / "roofline.png")
    if args.json:
        print(text, end="")
        return 0
    if args.quiet:
        return 0
    slo = f", SLO {args.slo_ms:g} ms" if args.slo_ms is not None else ""
    table = Table("#", "device (backend)", "prec.", "ms", "per s", "$/M inf.", "SLO", "basis",
                  title=f"{escape(result.model)}, batch {result.batch}{slo}")
    for i, c in enumerate(result.ranked, 1):
        cost = c.cost_per_million
        meets = {None: "-", True: "yes", False: "[red]no[/]"}[c.meets(args.slo_ms)]
        basis = c.basis + ("" if c.fits else ", [red]does not fit memory[/]")
        table.add_row(str(i), f"{c.device.name} ({c.device.backend})", c.precision,
                      f"{c.predicted_ms:.3g}", "-" if c.throughput is None else f"{c.throughput:.3g}",
                      "-" if cost is None else f"{cost:.3g}", meets, basis)
    console = Console()
    console.print(table)
    console.print("'bound only': no device of that kind ran here, so the row is the roofline bound "
                  "(a floor: real latency adds launch overhead and lost efficiency). Every device "
                  f"figure's source is in {escape(str(out / 'advise.json'))}; plot: "
                  + (escape(str(out / "roofline.png")) if plot else "matplotlib missing"))
    return 0


def _passes(args: argparse.Namespace) -> int:
    import inspect

    from slimgraph.passes import PASSES, RECIPES

    rows = []
    for name, cls in PASSES.items():
        params = inspect.signature(cls.__init__).parameters
        options = {k: (None if p.default is p.empty else p.default)
                   for k, p in params.items() if k != "self"}
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        rows.append({"name": name, "class": cls.__name__, "options": options, "doc": doc})
    if args.json:
        print(json.dumps({"passes": rows, "recipes": RECIPES}, indent=2, default=str))
        return 0
    table = Table("pass", "options", "does", title="passes")
    for r in rows:
        table.add_row(r["name"], ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "-",
                      r["doc"])
    console = Console()
    console.print(table)
    recipes = Table("recipe", "pipeline", title="recipes")
    for name, spec in RECIPES.items():
        recipes.add_row(name, spec)
    console.print(recipes)
    return 0


def _backends(args: argparse.Namespace) -> int:
    from slimgraph.backends import BACKENDS

    rows = [{"name": b.name, "available": b.available(), "reason": b.unavailable_reason(),
             "description": b.description} for b in BACKENDS.values()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table("backend", "here", "description", title="backends")
    for r in rows:
        here = "[green]available[/]" if r["available"] else f"[yellow]unavailable[/]: {r['reason']}"
        table.add_row(r["name"], here, r["description"])
    Console().print(table)
    return 0



def _partition(args: argparse.Namespace) -> int:
    from slimgraph.parallel import partition

    console = Console(stderr=True, quiet=args.quiet or args.json)
    with console.status("profiling and cutting"):
        result = partition(args.model, args.out, stages=args.stages, balance=args.balance,
                           max_stage_bytes=args.max_stage_bytes, batch=args.batch,
                           threads=args.threads, calibration=args.calib, force=args.force)
    if args.json:
        print(json.dumps(result.pipeline, indent=2))
    elif not args.quiet:
        table = Table("stage", "nodes", "weight bytes", "measured ms", "bytes/sample to next",
                      title=f"{result.out}: {len(result.pipeline['stages'])} stages, slowest / "
                            f"fastest {result.pipeline['spread']}x")
        for i, s in enumerate(result.pipeline["stages"]):
            table.add_row(str(i), f"{s['start']}-{s['end'] - 1}", f"{s['weight_bytes']:,}",
                          f"{s['measured_ms']:.3g}", f"{s['out_bytes_per_sample']:,}")
        Console().print(table)
        check = result.manifest["verification"]
        Console().print(f"verified: pipelined outputs vs the whole model, max abs diff "
                        f"{check['max_abs_diff']:.3g} on {check['feeds']} feeds")
    return 0


def _run(args: argparse.Namespace) -> int:
    from slimgraph.parallel.run import run

    result = run(args.artifact, args.data, args.out, batch=args.batch, workers=args.workers,
                 ray_address=args.ray, local=args.local, threads=args.threads,
                 progress=not (args.quiet or args.json), force=args.force)
    summary = {"out": str(result.out), "samples": result.samples, "mode": result.mode,
               "actors": result.actors, "seconds": round(result.seconds, 3),
               "setup_seconds": result.setup_seconds,
               "samples_per_s": round(result.samples_per_s, 1)}
    if args.json:
        print(json.dumps(summary, indent=2))
    elif not args.quiet:
        Console().print(f"{result.samples} samples -> {result.out} ({result.mode}"
                        f"{f', {result.actors} actors' if result.actors else ''}): "
                        f"{result.seconds:.2f} s, {result.samples_per_s:.1f} samples/s "
                        f"(+ {result.setup_seconds:.1f} s to start)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
