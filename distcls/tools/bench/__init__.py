"""Benchmarks: distcls against plain PyTorch, side by side in one run. Measured, never asserted.

One module per benchmark: `train` (train and transfer), `label`, `serve`, `autoscale`, `recipe`, `scale`, `ingest`;
`harness` holds what they share (machine record, real photos, the ImageNet checkpoint, the load generator).
`run_bench` runs the ones asked for on a loopback S3 server and writes bench.json; `table` prints the ratios.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

from distcls import DistclsError, storage
from distcls.tools.config import BenchConfig
from distcls.tools.s3server import S3Server, restore_env, use_server_env


def table(results: dict) -> list[str]:
    """One line per measured ratio, next to its roadmap target (targets are for the 2-core CPU machine)."""
    rows = []
    for key, value in results.get("train", {}).items():
        if isinstance(value, dict):
            rows.append((f"train {key.replace('_', ', ')} vs plain loop (per worker)", value["ratio"], ">= 0.95"))
    if "label" in results:
        label = results["label"]
        rows += [
            ("label vs plain PyTorch DataLoader script", label["ratio_vs_plain_torch"], ">= 2.0"),
            (
                f"label vs plain {label['default_runtime']} DataLoader script (same runtime)",
                label["ratio_vs_plain_same_runtime"],
                ">= 0.9",
            ),
            (f"label vs {label['default_runtime']} model-only ceiling", label["ratio_vs_ceiling_same_runtime"], ">= 0.6"),
            ("label top-1 agreement, default runtime vs torch", label["top1_agreement_default_vs_torch"], ">= 0.995"),
        ]
    if "serve" in results:
        serve, n = results["serve"], results["serve"]["ratio_clients"]
        rows += [
            (f"serve req/s vs plain PyTorch server, {n} clients", serve["ratio_rps_vs_plain_torch"], ">= 1.5"),
            (f"serve p99 vs plain PyTorch server, {n} clients", serve["ratio_p99_vs_plain_torch"], "<= 1.0"),
            (
                f"serve req/s vs plain {serve['default_runtime']} server, {n} clients",
                serve["ratio_rps_vs_plain_same_runtime"],
                ">= 0.8",
            ),
        ]
        if "ratio_p50_1client_vs_plain_same_runtime" in serve:
            rows.append(
                (
                    f"serve p50 vs plain {serve['default_runtime']} server, 1 client",
                    serve["ratio_p50_1client_vs_plain_same_runtime"],
                    "<= 2.0",
                )
            )
    if "autoscale" in results:
        a = results["autoscale"]
        rows += [
            ("autoscale: most classifier replicas under load (1..3)", a["max_replicas_seen"], "> 1"),
            ("autoscale: seconds from the end of load back to 1 replica", a["scale_down_s"] or float("nan"), None),
            ("autoscale: failed requests", a["failed_requests"], "0"),
            ("autoscale: cold start from 0 replicas, seconds", a["cold_start_s"] or float("nan"), None),
        ]
    if "resume" in results:
        r = results["resume"]
        rows += [
            (f"resume: seconds lost to a mid-epoch kill, step checkpoints every {r['every_steps']}", r["steps"]["lost_s"], None),
            ("resume: seconds lost to a mid-epoch kill, epoch checkpoints only", r["epochs"]["lost_s"], None),
            ("resume: samples trained twice, step checkpoints", r["steps"]["repeated_samples"], None),
            ("resume: samples trained twice, epoch checkpoints only", r["epochs"]["repeated_samples"], None),
            ("resume: one step checkpoint, seconds", r["step_checkpoint_s"], None),
            ("resume: step checkpoint cost / the steps between two", r["checkpoint_overhead_fraction"], None),
        ]
    if "transfer" in results:
        rows.append(("transfer: pretrained minus scratch test accuracy", results["transfer"]["pretrained_minus_scratch"], None))
    if "recipe" in results:
        rows += [
            (
                "recipe: min test accuracy ratio, default flags / plain loop",
                results["recipe"]["min_ratio_default_vs_plain"],
                ">= 0.98",
            ),
            ("recipe: most points below the plain loop", results["recipe"]["max_points_below_plain"], "<= 2"),
            ("recipe: largest data wait share", results["recipe"]["max_data_wait_fraction"], "< 0.15"),
        ]
    if "plan_only" in results.get("scale", {}):
        po = results["scale"]["plan_only"]
        rows += [
            (f"scale --plan-only: rerun driver peak RSS, MB ({po['objects']:,} keys)", po["driver_peak_rss_mb"], "<= 1024"),
            ("scale --plan-only: rerun planning with half done, seconds", po["subtract_s"], "<= 300"),
            ("scale --plan-only: listing into plan shards, keys/s", po["keys_per_s"], None),
        ]
    elif "scale" in results:
        sc = results["scale"]
        rows += [
            (f"scale: rows / objects ({sc['objects']} objects, {sc['store']})", sc["rows"] / sc["objects"], "1"),
            ("scale: distinct paths / objects", sc["distinct_paths"] / sc["objects"], "1"),
            ("scale: driver peak RSS, MB", sc["driver_peak_rss_mb"], "<= 1024"),
            ("scale: seconds to the first part", sc["time_to_first_part_s"], "<= 60"),
            ("scale: rerun with everything done, seconds", sc["rerun_done_s"], "<= 60"),
            ("scale: planning with half done, seconds", sc["resume_half_s"], None),
            ("scale: images/s end to end", sc["images_per_s"], None),
            ("scale: images/s first to last batch", sc["steady_images_per_s"], None),
            ("scale: rows after kill at ~50% and rerun / objects", sc["rows_after_kill_and_rerun"] / sc["objects"], "1"),
            ("scale: listing, keys/s", sc["list_keys_per_s"], None),
        ]
    if "trust" in results:
        rows += trust_rows(results["trust"])
    if "ingest" in results:
        from distcls.tools.bench.ingest import table_rows

        rows += table_rows(results["ingest"])
    if "imbalance" in results:
        im = results["imbalance"]
        rows.append(
            (
                f"imbalance: best ({im['best']}) minus uniform CE, macro F1 points",
                im["best_minus_uniform_macro_f1_points"],
                ">= 8",
            )
        )
        for variant, r in im["runs"].items():
            rows.append((f"imbalance: {variant}, worst-class recall", r["worst_class_recall"], None))
    if "modern" in results:
        m = results["modern"]
        rows.append((f"modern: best ({m['best']}) minus default flags, test points", m["best_minus_default_points"], ">= 1.5"))
    if "tune" in results:
        t = results["tune"]
        rows.append(("tune: best trial minus default flags, test points", t["best_minus_default_points"], ">= 2"))
        soup = t["soup_minus_best_points"]
        rows.append(("tune: greedy soup minus best trial, test points", float("nan") if soup is None else soup, ">= 0"))
    lines = [f"{'measure':<66} {'value':>7}  target"]
    for name, value, target in rows:
        lines.append(f"{name:<66} {value:7.2f}  {target or ''}")
    return lines


def trust_rows(t: dict) -> list[tuple]:
    rows = []
    if "calibration" in t:
        c = t["calibration"]
        rows += [
            ("trust: test-split ECE, raw softmax", c["ece_before"], None),
            ("trust: test-split ECE, temperature-scaled", c["ece_after"], "<= 0.02"),
        ]
    if "ood" in t:
        o = t["ood"]
        for name in ("digits", "photos", "noise"):
            rows += [
                (f"trust: OOD AUROC vs {name}, max-softmax", o[name]["auroc_max_softmax"], None),
                (f"trust: OOD AUROC vs {name}, energy", o[name]["auroc_energy"], ">= 0.90" if name == "digits" else None),
            ]
        rows.append(("trust: --unknown auto keeps of the test split", o["unknown_auto_keeps"], ">= 0.94"))
    if "label_issues" in t:
        li = t["label_issues"]
        rows += [
            ("trust: find-label-issues precision (10% flipped)", li["precision"], ">= 0.8"),
            ("trust: find-label-issues recall (10% flipped)", li["recall"], ">= 0.6"),
        ]
    if "dedup" in t:
        d = t["dedup"]
        rows += [
            ("trust: dedup recall of planted copies", d["recall"], ">= 0.98"),
            ("trust: dedup false groups", d["false_groups"], "0"),
        ]
    if "dedup_scale" in t:
        d = t["dedup_scale"]
        rows += [
            (f"trust: dedup IVF on {d['embeddings']:,} embeddings, seconds", d["seconds"], None),
            ("trust: dedup IVF recall of planted near-copies", d["recall"], None),
            ("trust: dedup IVF peak RSS, GB", d["peak_rss_gb"], None),
        ]
    return rows


def run_bench(cfg: BenchConfig) -> dict:
    import torch

    from distcls.runtime import init_ray
    from distcls.tools.bench.harness import machine
    from distcls.tools.bench.train import bench_train, bench_transfer

    if cfg.use_gpu and not torch.cuda.is_available():  # checked here: validating a config never probes CUDA
        raise DistclsError("bench: --use-gpu, but no CUDA GPU is visible to PyTorch on this machine; drop --use-gpu")
    results: dict = {"settings": dataclasses.asdict(cfg)}
    with S3Server(port=0) as server:
        previous = use_server_env(server)
        try:
            results["machine"] = machine()
            if cfg.which == "trust":
                from distcls.tools.bench.trust import bench_trust

                init_ray(num_cpus=max(os.cpu_count() or 1, 4))
                with tempfile.TemporaryDirectory(prefix="distcls-bench-trust-") as local:
                    results["trust"] = bench_trust(cfg, local)
            elif cfg.which in ("imbalance", "modern", "tune"):
                from distcls.tools.bench.modern import bench_modern_all

                init_ray(num_cpus=max(os.cpu_count() or 1, 4))
                results[cfg.which] = bench_modern_all(cfg)
            elif cfg.which == "ingest":  # starts and stops Ray itself: its plain script and 1M driver run without it
                from distcls.tools.bench.ingest import bench_ingest

                results["ingest"] = bench_ingest(cfg, "s3://bench")
            elif cfg.which == "resume":
                from distcls.tools.bench.resume import bench_resume

                init_ray(num_cpus=max(os.cpu_count() or 1, 4))
                results["resume"] = bench_resume(cfg)
            elif cfg.which == "scale":  # `distcls label` runs as its own process with its own Ray
                from distcls.tools.bench.scale import bench_scale

                results["scale"] = bench_scale(cfg)
            else:
                init_ray(num_cpus=max(os.cpu_count() or 1, 4))
            if cfg.which in ("train", "all"):
                results["train"] = bench_train(cfg, "s3://bench")
            if cfg.which in ("label", "all"):
                from distcls.tools.bench.label import bench_label

                with tempfile.TemporaryDirectory(prefix="distcls-bench-label-") as local:
                    results["label"] = bench_label(cfg, "s3://bench" if cfg.label_storage == "s3" else local)
            if cfg.which in ("serve", "all"):
                from distcls.tools.bench.serve import bench_serve

                results["serve"] = bench_serve(cfg, "s3://bench")
            if cfg.which in ("autoscale", "all"):
                from distcls.tools.bench.autoscale import bench_autoscale

                results["autoscale"] = bench_autoscale(
                    "s3://bench",
                    clients_high=cfg.autoscale_clients,
                    load_seconds=cfg.autoscale_load_seconds,
                    idle_seconds=cfg.autoscale_idle_seconds,
                    out_png=os.path.splitext(cfg.out)[0] + "-autoscale.png",
                )
            if cfg.which in ("transfer", "all"):
                results["transfer"] = bench_transfer(cfg, "s3://bench")
            if cfg.which in ("recipe", "all"):
                from distcls.tools.bench.recipe import bench_recipe

                results["recipe"] = bench_recipe(cfg)
        finally:
            restore_env(previous)
    storage.write_text(cfg.out, json.dumps(results, indent=2))
    print("\n" + "\n".join(table(results)), flush=True)
    return results
