"""`distcls` console script: subcommand -> one config dataclass -> one library call."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections.abc import Callable

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
    ReviewConfig,
    ServeConfig,
    SoupConfig,
    TrainConfig,
    TuneConfig,
    add_arguments,
    config_from_args,
)
from distcls.tools.config import BenchConfig, DemoConfig, FashionMnistConfig, S3ServerConfig

Handler = Callable[[argparse.Namespace], int]


def cmd_data_fashion_mnist(args: argparse.Namespace) -> int:
    from distcls.tools.fmnist import write_fashion_mnist

    cfg = config_from_args(FashionMnistConfig, args)
    summary = write_fashion_mnist(cfg)
    for split, counts in summary["counts"].items():
        print(
            f"{split}: {sum(counts.values())} images in {len(counts)} classes -> "
            f"{cfg.out.rstrip('/')}/{split}/<class>/<index>.png"
        )
    print(f"wrote {summary['total']} PNGs in {summary['seconds']:.1f}s from {summary['source']}")
    return 0


def cmd_s3_server(args: argparse.Namespace) -> int:
    from distcls.tools.s3server import S3Server

    cfg = config_from_args(S3ServerConfig, args)
    server = S3Server(host=cfg.host, port=cfg.port).start()
    print(f"S3-compatible server (moto) listening on {server.endpoint_url}; Ctrl-C stops it.")
    print("Point clients at it with:")
    for key, value in server.env().items():
        print(f"  export {key}={value}")
    sys.stdout.flush()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping S3 server")
    finally:
        server.stop()
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from distcls.train.trainer import run_training

    result = run_training(config_from_args(TrainConfig, args))
    m = result["metrics"]
    print(f"best checkpoint: {result['checkpoint']}")
    print(f"  epoch {m['epoch']}: val_accuracy {m['val_accuracy']:.4f}  val_macro_f1 {m['val_macro_f1']:.4f}")
    print(f"run: {result['run']} (result.json, curves.png)")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from distcls.train.distill import run_distillation

    result = run_distillation(config_from_args(DistillConfig, args))
    m, d = result["metrics"], result["distillation"]
    print(f"best checkpoint: {result['checkpoint']}")
    print(
        f"  epoch {m['epoch']}: val_accuracy {m['val_accuracy']:.4f}  val_macro_f1 {m['val_macro_f1']:.4f}  "
        f"(teacher {d['teacher_architecture']} {d['teacher_id'][:12]}..., T={d['temperature']}, alpha={d['alpha']})"
    )
    print(f"run: {result['run']} (result.json, curves.png)")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from distcls.train.tune import run_tune

    result = run_tune(config_from_args(TuneConfig, args))
    best = result["best"]
    print(f"best trial {best['trial']}: val_accuracy {best['val_accuracy']:.4f} -> {best['checkpoint']}")
    if result.get("soup"):
        soup = result["soup"]
        print(f"soup ({len(soup['kept'])} ingredients): val_accuracy {soup['val_accuracy']:.4f} -> {soup['checkpoint']}")
    print(f"search: {result['run']} (results.parquet, results.md, trials.png, best.json)")
    return 0


def cmd_soup(args: argparse.Namespace) -> int:
    from distcls.train.soup import run_soup

    run_soup(config_from_args(SoupConfig, args))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from distcls.export import run_export

    meta = run_export(config_from_args(ExportConfig, args))
    e = meta["export"]
    a = e["agreement"]
    print(
        f"wrote {e['out']}: {e['format']}{' int8' if e['quantization'] else ''}, {e['file']} "
        f"{e['file_bytes'] / 1e6:.1f} MB, model {meta['weights_sha256'][:12]}..."
    )
    print(
        f"  top-1 agrees with the checkpoint on {a['agree']}/{a['images']} real images ({a['rate']:.2%}); "
        f"max |logit diff| {a['max_abs_logit_diff']:.4f}"
    )
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from distcls.compare import run_compare

    cfg = config_from_args(CompareConfig, args)
    table = run_compare(cfg)
    print(table["text"])
    print(f"wrote {cfg.out.rstrip('/')}/compare.json, compare.md, compare.png")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from distcls.evaluate import run_evaluation

    cfg = config_from_args(EvaluateConfig, args)
    report = run_evaluation(cfg)
    print(
        f"accuracy {report['accuracy']:.4f}  macro_f1 {report['macro_f1']:.4f}  "
        f"on {report['num_samples']} images (skipped {report['skipped']})"
    )
    print(f"wrote {cfg.out.rstrip('/')}/report.json, report.md, confusion_matrix.png")
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    from distcls.label import run_labeling

    cfg = config_from_args(LabelConfig, args)
    s = run_labeling(cfg)
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


def cmd_serve(args: argparse.Namespace) -> int:
    from distcls.serving import run_serve

    run_serve(config_from_args(ServeConfig, args))
    return 0


def cmd_serve_config(args: argparse.Namespace) -> int:
    import yaml

    from distcls.infer.modelfile import trust_env
    from distcls.serving import is_loopback, serve_config, warn_no_auth

    cfg = config_from_args(ServeConfig, args)
    if cfg.no_auth and not is_loopback(cfg.host):
        warn_no_auth(cfg)
    doc = serve_config(cfg)
    if trust_env():  # --trust-torchscript / DISTCLS_TRUSTED_MODELS must reach the replicas where they run
        doc["applications"][0]["runtime_env"] = {"env_vars": trust_env()}
    print("# Ray Serve config for distcls: `serve deploy FILE`, or a KubeRay RayService's serveConfigV2.")
    print("# The API token is read from DISTCLS_API_TOKEN on the cluster, never from this file; on a host other")
    print("# than loopback the application refuses to start without it, unless no_auth is true.")
    print(yaml.safe_dump(doc, sort_keys=False), end="")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from distcls.models import list_models

    for m in list_models():
        print(f"{m['name']:<20} {m['parameters'] / 1e6:6.1f}M params  weights: {', '.join(m['weights'])}")
    return 0


def cmd_from_pretrained(args: argparse.Namespace) -> int:
    from distcls.checkpoint import from_pretrained

    cfg = config_from_args(FromPretrainedConfig, args)
    meta = from_pretrained(cfg.out, cfg.model, cfg.weights, cfg.image_size)
    print(
        f"wrote {cfg.out} ({meta['architecture']}, {meta['num_classes']} ImageNet classes, "
        f"sha256 {meta['weights_sha256'][:12]}...)"
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from distcls.tools.bench import run_bench

    cfg = config_from_args(BenchConfig, args)
    run_bench(cfg)
    print(f"wrote {cfg.out}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from distcls.calibrate import run_calibrate

    run_calibrate(config_from_args(CalibrateConfig, args))
    return 0


def cmd_review(args: argparse.Namespace) -> int:
    from distcls.curate.review import run_review

    cfg = config_from_args(ReviewConfig, args)
    result = run_review(cfg)
    print(
        f"review: {result['rows']} of {result['of']} rows by {cfg.by}{' per class' if cfg.per_class else ''}"
        + (f" ({result['unreadable']} images unreadable)" if result["unreadable"] else "")
    )
    out = cfg.out.rstrip("/")
    print(f"  {out}/review.parquet  {out}/contact_sheet.png  {out}/index.html")
    return 0


def cmd_dedup(args: argparse.Namespace) -> int:
    from distcls.curate.dedup import run_dedup

    cfg = config_from_args(DedupConfig, args)
    s = run_dedup(cfg)
    what = f"{s['images']} images" + (f" against {s['against_images']}" if cfg.against else "")
    print(
        f"dedup: {what}, {s['dimension']}-d embeddings: {s['candidates']} candidates (cosine >= {s['threshold']}), "
        f"{s['pairs']} near-duplicate pairs in {s['groups']} groups ({s['images_in_groups']} images); {s['method']} "
        f"search, {s['seconds']:.1f}s"
    )
    print(f"  {cfg.out.rstrip('/')}/groups.parquet, pairs.parquet, dedup.json, contact_sheet.png")
    return 0


def cmd_find_label_issues(args: argparse.Namespace) -> int:
    from distcls.curate.label_issues import run_find_label_issues

    cfg = config_from_args(FindLabelIssuesConfig, args)
    s = run_find_label_issues(cfg)
    print(
        f"find-label-issues: {s['issues']} likely label issues among {s['predicted']} images "
        f"(out-of-sample accuracy {s['out_of_sample_accuracy']:.4f}; {s['seconds']:.0f}s)"
    )
    print(f"  {cfg.out.rstrip('/')}/label_issues.parquet (ranked), contact_sheet.png, summary.json")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from distcls.tools.demo import run_demo

    run_demo(config_from_args(DemoConfig, args))
    return 0


# (subcommand path, config class, handler, help, description); None config = no options.
COMMANDS = (
    (
        ("data", "fashion-mnist"),
        FashionMnistConfig,
        cmd_data_fashion_mnist,
        "Fashion-MNIST as PNGs in URI/{train,test}/<class>/",
        "Write Fashion-MNIST as PNGs in URI/{train,test}/<class>/<index>.png.",
    ),
    (
        ("s3-server",),
        S3ServerConfig,
        cmd_s3_server,
        "run an S3-compatible server on loopback until interrupted",
        "Run moto's S3-compatible server until Ctrl-C; prints AWS_ENDPOINT_URL.",
    ),
    (
        ("train",),
        TrainConfig,
        cmd_train,
        "fine-tune a pretrained model with Ray Train",
        "Fine-tune a pretrained classifier on images in storage (Ray Train, DDP).",
    ),
    (
        ("distill",),
        DistillConfig,
        cmd_distill,
        "train a small student on a teacher's soft targets (Ray Train)",
        "Knowledge distillation: a student trained on a teacher checkpoint's soft targets plus the labels, "
        "with everything `distcls train` has.",
    ),
    (
        ("tune",),
        TuneConfig,
        cmd_tune,
        "search hyperparameters over train runs (Ray Tune, ASHA)",
        "A Ray Tune search over `distcls train` runs (lr, weight decay, backbone lr scale, augmentation, mixup, "
        "epochs) with ASHA early stopping; results table, best.json, optional soup of the top trials.",
    ),
    (
        ("soup",),
        SoupConfig,
        cmd_soup,
        "average fine-tuned checkpoints into one model (uniform or greedy soup)",
        "Model soup (Wortsman et al. 2022): average the weights of checkpoints of one architecture; greedy keeps an "
        "ingredient only if validation accuracy rises.",
    ),
    (
        ("export",),
        ExportConfig,
        cmd_export,
        "export a checkpoint to ONNX or TorchScript (optionally int8)",
        "Export a checkpoint for label and serve (ONNX via onnxruntime, or TorchScript), checked on real images.",
    ),
    (
        ("compare",),
        CompareConfig,
        cmd_compare,
        "accuracy, F1, size and images/s of checkpoints and exports",
        "Evaluate checkpoints and exports on one test split: a table and a plot of accuracy against images/s.",
    ),
    (
        ("evaluate",),
        EvaluateConfig,
        cmd_evaluate,
        "evaluate a checkpoint over a whole labeled split",
        "Accuracy, top-5, precision/recall/F1, confusion matrix over every image.",
    ),
    (
        ("calibrate",),
        CalibrateConfig,
        cmd_calibrate,
        "fit a temperature (and the `unknown` threshold) for a checkpoint",
        "Temperature scaling on labeled data the model did not train on: a new model directory, weights untouched.",
    ),
    (
        ("review",),
        ReviewConfig,
        cmd_review,
        "the labeled rows most worth a look: Parquet, contact sheet, web page",
        "Rank a labeling job's rows by margin, entropy, OOD score or score; write the top N for a person to check.",
    ),
    (
        ("find-label-issues",),
        FindLabelIssuesConfig,
        cmd_find_label_issues,
        "likely mislabeled training images (K-fold fine-tuning + cleanlab)",
        "Out-of-sample probabilities from K fine-tuning runs on Ray, ranked by cleanlab's confident learning.",
    ),
    (
        ("dedup",),
        DedupConfig,
        cmd_dedup,
        "near-duplicate groups and train/test leakage from label embeddings",
        "Near-duplicates by cosine similarity of `distcls label --embeddings` output (exact or faiss IVF search).",
    ),
    (
        ("label",),
        LabelConfig,
        cmd_label,
        "label every image under a prefix into Parquet (batch inference)",
        "Offline labeling: one Parquet row per object; reruns add only what is missing.",
    ),
    (
        ("serve",),
        ServeConfig,
        cmd_serve,
        "serve a checkpoint over HTTP with Ray Serve (until Ctrl-C)",
        "Online classification endpoint: autoscaling replicas with request batching.",
    ),
    (
        ("serve-config",),
        ServeConfig,
        cmd_serve_config,
        "print a Ray Serve config file for `serve deploy`",
        "Print a Ray Serve config (serve deploy, KubeRay RayService serveConfigV2) for these flags.",
    ),
    (("models",), None, cmd_models, "list model architectures and their weights", None),
    (
        ("checkpoint", "from-pretrained"),
        FromPretrainedConfig,
        cmd_from_pretrained,
        "the pretrained ImageNet classifier as a checkpoint",
        "Write a checkpoint of a pretrained ImageNet classifier, as it is.",
    ),
    (
        ("bench",),
        BenchConfig,
        cmd_bench,
        "benchmarks against plain PyTorch (train, label, serve, transfer, recipe, all)",
        "Measured ratios against plain PyTorch baselines, side by side in one run.",
    ),
    (
        ("demo",),
        DemoConfig,
        cmd_demo,
        "run the whole product end to end on real data (local Ray + S3)",
        "Fashion-MNIST into the embedded S3 server, through every job.",
    ),
)
GROUPS = {
    "data": ("dataset", "put a real dataset into storage (fashion-mnist)"),
    "checkpoint": ("action", "make checkpoints (from-pretrained)"),
}


TRUST_HELP = (
    "run TorchScript exports, whose code runs as they load: only if you trust whoever can write the "
    "model's bucket (sets DISTCLS_TRUST_TORCHSCRIPT=1 here and in every Ray worker; to trust single "
    "models, list their sha256s in DISTCLS_TRUSTED_MODELS instead)"
)


def with_trust(handler: Handler) -> Handler:
    """Apply --trust-torchscript before the command runs (and starts Ray, whose workers then inherit it)."""

    def run(args: argparse.Namespace) -> int:
        if args.trust_torchscript:
            from distcls.infer.modelfile import trust_torchscript

            trust_torchscript()
        return handler(args)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distcls",
        description="Fine-tune, evaluate, label and serve pretrained image classifiers on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"distcls {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for path, cfg_cls, handler, help_text, description in COMMANDS:
        where = sub
        if len(path) == 2:
            if path[0] not in groups:
                dest, group_help = GROUPS[path[0]]
                group = sub.add_parser(path[0], help=group_help)
                groups[path[0]] = group.add_subparsers(dest=dest, metavar=dest.upper(), required=True)
            where = groups[path[0]]
        cmd = where.add_parser(path[-1], help=help_text, description=description or help_text)
        skip = ()
        if cfg_cls is BenchConfig:
            which = BenchConfig.__dataclass_fields__["which"].metadata["choices"]
            cmd.add_argument("which", nargs="?", choices=which, default=None, help="which benchmark (default: train)")
            skip = ("which",)
        if cfg_cls is DistillConfig:
            skip = ("model",)  # --student names the architecture
        if cfg_cls is CompareConfig:
            cmd.add_argument("models", nargs="+", metavar="CKPT_OR_EXPORT", help="checkpoint or export directory URIs to compare")
            skip = ("models",)
        if cfg_cls is not None:
            add_arguments(cmd, cfg_cls, skip=skip)
        if cfg_cls in (CompareConfig, EvaluateConfig, LabelConfig, ServeConfig):  # the commands that load models
            cmd.add_argument("--trust-torchscript", action="store_true", help=TRUST_HELP)
            handler = with_trust(handler)
        cmd.set_defaults(handler=handler)
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
