"""`distcls` console script: one table of commands, each a config dataclass -> one library call -> a summary.

A row of COMMANDS names the subcommand, its config class, the library function (imported when the command
runs, so `distcls --help` stays light) and the printer of its summary. Everything a command does lives in
the library; this module parses, calls and prints.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

from distcls import DistclsError, __version__
from distcls.config import (
    CalibrateConfig,
    CompareConfig,
    DedupConfig,
    DistillConfig,
    EvaluateConfig,
    ExportConfig,
    FindLabelIssuesConfig,
    FromPretrainedConfig,
    LabelConfig,
    PackConfig,
    ReviewConfig,
    ServeConfig,
    SoupConfig,
    TrainConfig,
    TuneConfig,
    add_arguments,
    config_from_args,
)
from distcls.config.serve import RolloutSetConfig, RolloutStatusConfig
from distcls.tools.config import BenchConfig, DemoConfig, FashionMnistConfig, S3ServerConfig

Printer = Callable[[Any, Any], "int | None"]


class Command(NamedTuple):
    """One subcommand: `run` ("module:function") is called with the config; `printer(cfg, result)` prints the
    summary and may return the exit code (default 0)."""

    path: tuple[str, ...]
    config: type | None
    run: str
    help: str
    description: str | None = None
    printer: Printer | None = None


# --- summaries -----------------------------------------------------------------------------------------


def out_of(cfg: Any) -> str:
    return cfg.out.rstrip("/")


def print_fashion_mnist(cfg: FashionMnistConfig, summary: dict) -> None:
    for split, counts in summary["counts"].items():
        print(f"{split}: {sum(counts.values())} images in {len(counts)} classes -> {out_of(cfg)}/{split}/<class>/<index>.png")
    print(f"wrote {summary['total']} PNGs in {summary['seconds']:.1f}s from {summary['source']}")


def print_pack(cfg: PackConfig, s: dict) -> None:
    from distcls.pack import summary_line

    print(summary_line(s))


def print_run(cfg: TrainConfig, result: dict) -> None:
    m = result["metrics"]
    print(f"best checkpoint: {result['checkpoint']}")
    line = f"  epoch {m['epoch']}: val_accuracy {m['val_accuracy']:.4f}  val_macro_f1 {m['val_macro_f1']:.4f}"
    if "distillation" in result:
        d = result["distillation"]
        line += f"  (teacher {d['teacher_architecture']} {d['teacher_id'][:12]}..., T={d['temperature']}, alpha={d['alpha']})"
    print(line)
    print(f"run: {result['run']} (result.json, curves.png)")


def print_tune(cfg: TuneConfig, result: dict) -> None:
    best = result["best"]
    print(f"best trial {best['trial']}: val_accuracy {best['val_accuracy']:.4f} -> {best['checkpoint']}")
    if result.get("soup"):
        soup = result["soup"]
        print(f"soup ({len(soup['kept'])} ingredients): val_accuracy {soup['val_accuracy']:.4f} -> {soup['checkpoint']}")
    print(f"search: {result['run']} (results.parquet, results.md, trials.png, best.json)")


def print_export(cfg: ExportConfig, meta: dict) -> None:
    e, a = meta["export"], meta["export"]["agreement"]
    print(
        f"wrote {e['out']}: {e['format']}{' int8' if e['quantization'] else ''}, {e['file']} "
        f"{e['file_bytes'] / 1e6:.1f} MB, model {meta['weights_sha256'][:12]}..."
    )
    print(
        f"  top-1 agrees with the checkpoint on {a['agree']}/{a['images']} real images ({a['rate']:.2%}); "
        f"max |logit diff| {a['max_abs_logit_diff']:.4f}"
    )


def print_compare(cfg: CompareConfig, table: dict) -> None:
    print(table["text"])
    print(f"wrote {out_of(cfg)}/compare.json, compare.md, compare.png")


def print_evaluate(cfg: EvaluateConfig, report: dict) -> None:
    print(
        f"accuracy {report['accuracy']:.4f}  macro_f1 {report['macro_f1']:.4f}  "
        f"on {report['num_samples']} images (skipped {report['skipped']})"
    )
    print(f"wrote {out_of(cfg)}/report.json, report.md, confusion_matrix.png")


def print_label(cfg: LabelConfig, s: dict) -> int:
    if cfg.status:
        return 0 if s["complete"] else 1
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(s["errors_by_kind"].items())) or "none"
    print(
        f"total {s['total']} objects: labeled {s['labeled']} (errors {s['errors']}: {kinds}), "
        f"already done {s['skipped_done']}; {s['seconds']:.1f}s, {s['images_per_s']:.1f} images/s"
        + (f"; removed {s['duplicates_removed']} duplicate rows" if s.get("duplicates_removed") else "")
    )
    done = "complete, _SUCCESS.json written" if s["complete"] else "not complete: run it again to finish"
    print(f"output: {s['output']} ({s['distinct']} objects, one row each; model {s['model'][:12]}...; {done})")
    return 0


def print_models(cfg: None, models: list[dict]) -> None:
    for m in models:
        print(f"{m['name']:<20} {m['parameters'] / 1e6:6.1f}M params  weights: {', '.join(m['weights'])}")


def print_from_pretrained(cfg: FromPretrainedConfig, meta: dict) -> None:
    print(
        f"wrote {cfg.out} ({meta['architecture']}, {meta['num_classes']} ImageNet classes, "
        f"sha256 {meta['weights_sha256'][:12]}...)"
    )


def print_review(cfg: ReviewConfig, result: dict) -> None:
    print(
        f"review: {result['rows']} of {result['of']} rows by {cfg.by}{' per class' if cfg.per_class else ''}"
        + (f" ({result['unreadable']} images unreadable)" if result["unreadable"] else "")
        + (f" ({result['not_read']} not read: outside {result['root']})" if result.get("not_read") and result.get("root") else "")
    )
    if result.get("root") is None:
        print("  no thumbnails read: the labels' _plan.json names no --input; pass --root PREFIX to read them")
    print(f"  {out_of(cfg)}/review.parquet  {out_of(cfg)}/contact_sheet.png  {out_of(cfg)}/index.html")


def print_dedup(cfg: DedupConfig, s: dict) -> None:
    what = f"{s['images']} images" + (f" against {s['against_images']}" if cfg.against else "")
    print(
        f"dedup: {what}, {s['dimension']}-d embeddings: {s['candidates']} candidates (cosine >= {s['threshold']}), "
        f"{s['pairs']} near-duplicate pairs in {s['groups']} groups ({s['images_in_groups']} images); {s['method']} "
        f"search, {s['seconds']:.1f}s"
    )
    print(f"  {out_of(cfg)}/groups.parquet, pairs.parquet, dedup.json, contact_sheet.png")


def print_label_issues(cfg: FindLabelIssuesConfig, s: dict) -> None:
    print(
        f"find-label-issues: {s['issues']} likely label issues among {s['predicted']} images "
        f"(out-of-sample accuracy {s['out_of_sample_accuracy']:.4f}; {s['seconds']:.0f}s)"
    )
    print(f"  {out_of(cfg)}/label_issues.parquet (ranked), contact_sheet.png, summary.json")


def print_rollout_set(cfg: RolloutSetConfig, status: dict) -> int:
    from distcls.rollout import print_rollout_set

    return print_rollout_set(cfg, status)


def print_rollout_status(cfg: RolloutStatusConfig, status: dict) -> None:
    from distcls.rollout import print_rollout_status

    print_rollout_status(cfg, status)


def print_bench(cfg: BenchConfig, result: Any) -> None:
    print(f"wrote {cfg.out}")


# --- commands that are not one library call ----------------------------------------------------------------


def run_from_pretrained(cfg: FromPretrainedConfig) -> dict:
    from distcls.checkpoint import from_pretrained

    return from_pretrained(cfg.out, cfg.model, cfg.weights, cfg.image_size)


def run_models(cfg: None) -> list[dict]:
    from distcls.models import list_models

    return list_models()


# --- the table -------------------------------------------------------------------------------------------

COMMANDS = (
    Command(
        ("data", "fashion-mnist"),
        FashionMnistConfig,
        "distcls.tools.fmnist:write_fashion_mnist",
        "Fashion-MNIST as PNGs in URI/{train,test}/<class>/",
        "Write Fashion-MNIST as PNGs in URI/{train,test}/<class>/<index>.png.",
        print_fashion_mnist,
    ),
    Command(
        ("s3-server",),
        S3ServerConfig,
        "distcls.tools.s3server:serve_until_interrupted",
        "run an S3-compatible server on loopback until interrupted",
        "Run moto's S3-compatible server until Ctrl-C; prints AWS_ENDPOINT_URL.",
    ),
    Command(
        ("pack",),
        PackConfig,
        "distcls.pack:run_pack",
        "pack labeled images into Parquet shards (+ _dataset.json) for training at scale",
        "An ImageFolder prefix or a labeled manifest -> Parquet shards of encoded images (Hugging Face `datasets` "
        "image convention), an optional stratified val split, bad objects in _rejected.parquet; --resume continues "
        "a killed pack.",
        print_pack,
    ),
    Command(
        ("train",),
        TrainConfig,
        "distcls.train.trainer:run_training",
        "fine-tune a pretrained model with Ray Train",
        "Fine-tune a pretrained classifier on images in storage (Ray Train, DDP).",
        print_run,
    ),
    Command(
        ("distill",),
        DistillConfig,
        "distcls.train.distill:run_distillation",
        "train a small student on a teacher's soft targets (Ray Train)",
        "Knowledge distillation: a student trained on a teacher checkpoint's soft targets plus the labels, "
        "with everything `distcls train` has.",
        print_run,
    ),
    Command(
        ("tune",),
        TuneConfig,
        "distcls.train.tune:run_tune",
        "search hyperparameters over train runs (Ray Tune, ASHA)",
        "A Ray Tune search over `distcls train` runs (lr, weight decay, backbone lr scale, augmentation, mixup, "
        "epochs) with ASHA early stopping; results table, best.json, optional soup of the top trials.",
        print_tune,
    ),
    Command(
        ("soup",),
        SoupConfig,
        "distcls.train.soup:run_soup",
        "average fine-tuned checkpoints into one model (uniform or greedy soup)",
        "Model soup (Wortsman et al. 2022): average the weights of checkpoints of one architecture; greedy keeps an "
        "ingredient only if validation accuracy rises.",
    ),
    Command(
        ("export",),
        ExportConfig,
        "distcls.export:run_export",
        "export a checkpoint to ONNX or TorchScript (optionally int8)",
        "Export a checkpoint for label and serve (ONNX via onnxruntime, or TorchScript), checked on real images.",
        print_export,
    ),
    Command(
        ("compare",),
        CompareConfig,
        "distcls.compare:run_compare",
        "accuracy, F1, size and images/s of checkpoints and exports",
        "Evaluate checkpoints and exports on one test split: a table and a plot of accuracy against images/s.",
        print_compare,
    ),
    Command(
        ("evaluate",),
        EvaluateConfig,
        "distcls.evaluate:run_evaluation",
        "evaluate a checkpoint over a whole labeled split",
        "Accuracy, top-5, precision/recall/F1, confusion matrix over every image.",
        print_evaluate,
    ),
    Command(
        ("calibrate",),
        CalibrateConfig,
        "distcls.calibrate:run_calibrate",
        "fit a temperature (and the `unknown` threshold) for a checkpoint",
        "Temperature scaling on labeled data the model did not train on: a new model directory, weights untouched.",
    ),
    Command(
        ("review",),
        ReviewConfig,
        "distcls.curate.review:run_review",
        "the labeled rows most worth a look: Parquet, contact sheet, web page",
        "Rank a labeling job's rows by margin, entropy, OOD score or score; write the top N for a person to check.",
        print_review,
    ),
    Command(
        ("find-label-issues",),
        FindLabelIssuesConfig,
        "distcls.curate.label_issues:run_find_label_issues",
        "likely mislabeled training images (K-fold fine-tuning + cleanlab)",
        "Out-of-sample probabilities from K fine-tuning runs on Ray, ranked by cleanlab's confident learning.",
        print_label_issues,
    ),
    Command(
        ("dedup",),
        DedupConfig,
        "distcls.curate.dedup:run_dedup",
        "near-duplicate groups and train/test leakage from label embeddings",
        "Near-duplicates by cosine similarity of `distcls label --embeddings` output (exact or faiss IVF search).",
        print_dedup,
    ),
    Command(
        ("label",),
        LabelConfig,
        "distcls.label:run_labeling",
        "label every image under a prefix into Parquet (batch inference)",
        "Offline labeling: one Parquet row per object; reruns add only what is missing.",
        print_label,
    ),
    Command(
        ("serve",),
        ServeConfig,
        "distcls.serving:run_serve",
        "serve a checkpoint over HTTP with Ray Serve (until Ctrl-C)",
        "Online classification endpoint: autoscaling replicas with request batching.",
    ),
    Command(
        ("serve-config",),
        ServeConfig,
        "distcls.serving.app:print_serve_config",
        "print a Ray Serve config file for `serve deploy`",
        "Print a Ray Serve config (serve deploy, KubeRay RayService serveConfigV2) for these flags.",
    ),
    Command(
        ("rollout", "set"),
        RolloutSetConfig,
        "distcls.rollout:run_rollout_set",
        "change a running endpoint's traffic weights (admin token)",
        "New weights for a running endpoint's variants, applied live through Serve by its admin route "
        "(DISTCLS_ADMIN_TOKEN); waits until the endpoint routes by them.",
        print_rollout_set,
    ),
    Command(
        ("rollout", "status"),
        RolloutStatusConfig,
        "distcls.rollout:run_rollout_status",
        "a running endpoint's variants and their comparison, as a table",
        "Per variant requests, errors, latency, labels and mean score, and each variant's agreement with the "
        "primary on mirrored requests (GET /v1/rollout).",
        print_rollout_status,
    ),
    Command(("models",), None, "distcls.cli:run_models", "list model architectures and their weights", None, print_models),
    Command(
        ("checkpoint", "from-pretrained"),
        FromPretrainedConfig,
        "distcls.cli:run_from_pretrained",
        "the pretrained ImageNet classifier as a checkpoint",
        "Write a checkpoint of a pretrained ImageNet classifier, as it is.",
        print_from_pretrained,
    ),
    Command(
        ("bench",),
        BenchConfig,
        "distcls.tools.bench:run_bench",
        "benchmarks against plain PyTorch (train, label, serve, transfer, recipe, all)",
        "Measured ratios against plain PyTorch baselines, side by side in one run.",
        print_bench,
    ),
    Command(
        ("demo",),
        DemoConfig,
        "distcls.tools.demo:run_demo",
        "run the whole product end to end on real data (local Ray + S3)",
        "Fashion-MNIST into the embedded S3 server, through every job.",
    ),
)
GROUPS = {
    "data": ("dataset", "put a real dataset into storage (fashion-mnist)"),
    "checkpoint": ("action", "make checkpoints (from-pretrained)"),
    "rollout": ("action", "a running endpoint's traffic split between variants (set, status)"),
}
LOADS_MODELS = (CompareConfig, EvaluateConfig, LabelConfig, ServeConfig)  # the commands with --trust-torchscript


def resolve(target: str) -> Callable:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def handler_for(command: Command) -> Callable[[argparse.Namespace], int]:
    """Parse the config, make the one library call, print its summary; the exit code is the printer's or 0."""

    def handle(args: argparse.Namespace) -> int:
        if getattr(args, "trust_torchscript", False):
            from distcls.infer.modelfile import trust_torchscript

            trust_torchscript()  # before Ray starts, so its workers inherit it
        cfg = config_from_args(command.config, args) if command.config is not None else None
        result = resolve(command.run)(cfg)
        code = command.printer(cfg, result) if command.printer is not None else None
        return code or 0

    return handle


TRUST_HELP = (
    "run TorchScript exports, whose code runs as they load: only if you trust whoever can write the "
    "model's bucket (sets DISTCLS_TRUST_TORCHSCRIPT=1 here and in every Ray worker; to trust single "
    "models, list their sha256s in DISTCLS_TRUSTED_MODELS instead)"
)


def add_positionals(cmd: argparse.ArgumentParser, cfg_cls: type) -> tuple[str, ...]:
    """The few fields given as positional arguments (or named otherwise); returns the fields not to add as flags."""
    if cfg_cls is BenchConfig:
        which = BenchConfig.__dataclass_fields__["which"].metadata["choices"]
        cmd.add_argument("which", nargs="?", choices=which, default=None, help="which benchmark (default: train)")
        return ("which",)
    if cfg_cls is CompareConfig:
        cmd.add_argument("models", nargs="+", metavar="CKPT_OR_EXPORT", help="checkpoint or export directory URIs to compare")
        return ("models",)
    if cfg_cls is DistillConfig:
        return ("model",)  # --student names the architecture
    if cfg_cls is ServeConfig:  # repeatable NAME=URI flags
        for name in ("variant", "shadow"):
            help_text = ServeConfig.__dataclass_fields__[name].metadata["help"]
            cmd.add_argument(f"--{name}", dest=name, action="append", default=None, metavar="NAME=URI", help=help_text)
        return ("variant", "shadow")
    return ()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distcls",
        description="Fine-tune, evaluate, label and serve pretrained image classifiers on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"distcls {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for command in COMMANDS:
        where = sub
        if len(command.path) == 2:
            group_name = command.path[0]
            if group_name not in groups:
                dest, group_help = GROUPS[group_name]
                group = sub.add_parser(group_name, help=group_help)
                groups[group_name] = group.add_subparsers(dest=dest, metavar=dest.upper(), required=True)
            where = groups[group_name]
        cmd = where.add_parser(command.path[-1], help=command.help, description=command.description or command.help)
        if command.config is not None:
            add_arguments(cmd, command.config, skip=add_positionals(cmd, command.config))
        if command.config in LOADS_MODELS:
            cmd.add_argument("--trust-torchscript", action="store_true", help=TRUST_HELP)
        cmd.set_defaults(handler=handler_for(command))
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, Kubernetes, systemd), raised in the main thread so that the command stops the way
    Ctrl-C stops it: every `finally` runs, and Ray goes with it."""


def raise_terminated(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one stop at a time; SIGKILL remains for a stuck one
    raise Terminated()


def ray_running() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    ray_before = ray_running()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, raise_terminated) if in_main_thread else None
    try:
        return args.handler(args)
    except DistclsError as exc:
        print(f"distcls: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        print("terminated" if terminated else "interrupted", file=sys.stderr, flush=True)
        return 143 if terminated else 130
    finally:
        if ray_running() and not ray_before:  # a local instance it started goes (raylet, GCS, agents)
            sys.modules["ray"].shutdown()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def console() -> None:
    """The `distcls` command (and `python -m distcls.cli`): main() in a process of its own, which may also
    filter Ray's notices out of its own stderr (runtime.filter_driver_stderr)."""
    from distcls import runtime

    runtime.OWN_PROCESS = True
    sys.exit(main())


if __name__ == "__main__":
    console()
