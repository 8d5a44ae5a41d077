"""`distcls bench label`: `distcls label` end to end against plain scripts, one row per runtime.

Per runtime (torch, onnx), side by side in one run on the same JPEGs in the loopback S3 server:
- the model alone on preprocessed uint8 tensors, all cores (the ceiling no pipeline can beat);
- the plain script: list the prefix, DataLoader worker processes read (boto3 via s3fs), decode and
  preprocess with the same function, the model (the inference engine, that runtime) in the main process,
  one Parquet written; timed end to end;
- `distcls label --runtime R`, timed end to end (planning, actor start, warm-up and tail included).
The default runtime (auto) is the headline row; the labels of its run are compared with the torch run's
(top-1 agreement). Decode + preprocess alone is measured with and without JPEG draft decoding, on the
bench photos and on 12-megapixel photos.
"""

from __future__ import annotations

import io
import os
import tempfile
import time

import numpy as np
import torch

from distcls import storage
from distcls.config import LabelConfig
from distcls.infer import load_model, prepare_runtime
from distcls.tools.bench.scale import steady_rate
from distcls.tools.config import BenchConfig
from distcls.transforms import PreprocessSpec, preprocess_bytes

RUNTIME_ROWS = ("torch", "onnx")


def plain_label_rate(
    cfg: BenchConfig, prefix: str, checkpoint: str, out_path: str, runtime: str, steady: dict | None = None
) -> float:
    """The baseline script (see the module doc); `runtime` is the engine's torch or onnx. `steady` gets
    images_per_s from its first batch to its last (without start-up), to compare with distcls label's."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from torch.utils.data import DataLoader, Dataset

    from distcls.images import IMAGE_EXTENSIONS

    started = time.perf_counter()
    paths = storage.list_files(prefix, IMAGE_EXTENSIONS)
    model = load_model(checkpoint, runtime, "cuda" if cfg.use_gpu else "cpu", threads=os.cpu_count() or 1)
    spec, names_of = model.spec, model.class_names

    class Objects(Dataset):
        def __len__(self) -> int:
            return len(paths)

        def __getitem__(self, i: int):
            return torch.from_numpy(preprocess_bytes(storage.read_bytes(paths[i]), spec)), i

    loader = DataLoader(
        Objects(), batch_size=cfg.label_batch_size, num_workers=cfg.loader_workers, persistent_workers=False, prefetch_factor=4
    )
    names, labels, scores = [], [], []
    first = None
    for images, idx in loader:
        first = first or (time.perf_counter(), len(images))
        probs = torch.from_numpy(model.predict(images.numpy())).softmax(-1)
        top = probs.max(1)
        names += [paths[i] for i in idx.tolist()]
        labels += [names_of[j] for j in top.indices.tolist()]
        scores += top.values.tolist()
    if steady is not None and first:
        steady["images_per_s"] = (len(names) - first[1]) / max(time.perf_counter() - first[0], 1e-9)
    pq.write_table(pa.table({"path": names, "label": labels, "score": pa.array(scores, pa.float32())}), out_path)
    return len(paths) / (time.perf_counter() - started)


def model_ceiling(cfg: BenchConfig, checkpoint: str, runtime: str, batch_size: int | None = None) -> float:
    """Forward passes alone on preprocessed uint8 images (the engine, all cores), for 10 s after warm-up."""
    model = load_model(checkpoint, runtime, "cuda" if cfg.use_gpu else "cpu", threads=os.cpu_count() or 1)
    size = model.spec.image_size
    x = np.random.default_rng(0).integers(0, 256, (batch_size or cfg.label_batch_size, 3, size, size), dtype=np.uint8)
    for _ in range(3):
        model.predict(x)
    started, n = time.perf_counter(), 0
    while time.perf_counter() - started < cfg.ceiling_seconds:
        model.predict(x)  # returns numpy: on a GPU every batch is synchronised
        n += len(x)
    return n / (time.perf_counter() - started)


def _decode_all(args: tuple[list[bytes], dict, bool]) -> int:
    from distcls.images import decode_image
    from distcls.transforms import eval_transform

    photos, spec, draft = args
    spec = PreprocessSpec.from_dict(spec)
    for data in photos:
        if draft:
            preprocess_bytes(data, spec)
        else:  # the same steps with a full-size decode
            eval_transform(decode_image(data, spec.max_pixels), spec)
    return len(photos)


def decode_rate(photos: list[bytes], spec: PreprocessSpec, draft: bool = True) -> float:
    """Decode + preprocess alone (the function every job uses), from memory, one process per core."""
    from concurrent.futures import ProcessPoolExecutor

    cores = os.cpu_count() or 1
    chunks = [(photos[i::cores], spec.to_dict(), draft) for i in range(cores)]
    with ProcessPoolExecutor(cores) as pool:
        list(pool.map(_decode_all, [(c[0][:2], c[1], draft) for c in chunks]))  # warm-up: imports, first decodes
        started = time.perf_counter()
        done = sum(pool.map(_decode_all, chunks))
    return done / (time.perf_counter() - started)


def large_photos(n: int, size: tuple[int, int] = (4000, 3000)) -> list[bytes]:
    """N 12-megapixel JPEGs (quality 90), upscaled from the bench photos: a phone camera's output size."""
    from PIL import Image

    from distcls.tools.bench.harness import make_photos

    out = []
    for data in make_photos(n, seed=7):
        buf = io.BytesIO()
        Image.open(io.BytesIO(data)).resize(size, Image.BICUBIC).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def measure_decode(photos: list[bytes], spec: PreprocessSpec, checkpoint: str, n_large: int) -> dict:
    """Decode img/s with and without draft decoding on the bench photos and on 12 MP photos, and whether
    draft decoding changes the model's top-1 on the 12 MP ones."""
    big = large_photos(max(1, n_large))
    model = load_model(checkpoint, "torch", "cpu")
    from distcls.images import decode_image
    from distcls.transforms import eval_transform

    drafted = np.stack([preprocess_bytes(d, spec) for d in big])
    full = np.stack([eval_transform(decode_image(d, spec.max_pixels), spec) for d in big])
    agree = float((model.predict(drafted).argmax(1) == model.predict(full).argmax(1)).mean())
    out = {
        "top1_agreement_12mp_draft_vs_full": agree,
        "max_pixel_difference_12mp": int(np.abs(drafted.astype(int) - full.astype(int)).max()),
    }
    for name, sample in (("bench_photos", photos[:400]), ("photos_12mp", big)):
        out[name] = {
            "draft_images_per_s": decode_rate(sample, spec, True),
            "full_decode_images_per_s": decode_rate(sample, spec, False),
        }
        print(
            f"decode + preprocess, {name}: {out[name]['draft_images_per_s']:.1f} images/s with draft decoding, "
            f"{out[name]['full_decode_images_per_s']:.1f} without",
            flush=True,
        )
    print(f"  top-1 on 12 MP photos, draft vs full decode: {agree:.3f} agree", flush=True)
    return out


def label_top1(output: str) -> dict[str, str]:
    import pyarrow.parquet as pq

    from distcls.label import existing_parts

    labels: dict[str, str] = {}
    for part in existing_parts(output):
        t = pq.read_table(io.BytesIO(storage.read_bytes(part)), columns=["path", "label"]).to_pydict()
        labels.update(zip(t["path"], t["label"]))
    return labels


def run_distcls_label(cfg: BenchConfig, checkpoint: str, prefix: str, output: str, runtime: str) -> dict:
    from distcls.label import run_labeling

    return run_labeling(
        LabelConfig(
            checkpoint=checkpoint,
            input=prefix,
            output=output,
            runtime=runtime,
            batch_size=cfg.label_batch_size,
            concurrency=cfg.label_concurrency,
            cpus_per_replica=cfg.label_cpus_per_replica,
            num_gpus=1 if cfg.use_gpu else 0,
        ),
        progress=False,
    )


def bench_label(cfg: BenchConfig, root: str) -> dict:
    from distcls.tools.bench.harness import imagenet_checkpoint, make_photos

    checkpoint = imagenet_checkpoint(root, cfg.label_model)
    photos = make_photos(cfg.label_images)
    prefix = f"{root}/photos"
    storage.write_many(zip([f"{prefix}/{i:05d}.jpg" for i in range(len(photos))], photos))
    spec = load_model(checkpoint, "torch", "cpu").spec
    default_runtime = prepare_runtime(
        checkpoint, "auto", cfg.use_gpu, np.stack([preprocess_bytes(p, spec) for p in photos[:16]])
    )[0]  # compiled before anything is timed
    decode = measure_decode(photos, spec, checkpoint, cfg.label_large_photos)
    rows = {}
    for runtime in RUNTIME_ROWS:
        row = {"model_only_images_per_s": model_ceiling(cfg, checkpoint, runtime)}
        with tempfile.TemporaryDirectory() as d:
            plain_steady: dict = {}
            row["plain_images_per_s"] = plain_label_rate(
                cfg, prefix, checkpoint, os.path.join(d, "p.parquet"), runtime, plain_steady
            )
        label_runtime = "auto" if runtime == default_runtime else runtime  # the headline row runs the default
        summary = run_distcls_label(cfg, checkpoint, prefix, f"{root}/labels-{runtime}", label_runtime)
        row["distcls_images_per_s"] = summary["images_per_s"]
        row["plain_steady_images_per_s"] = plain_steady.get("images_per_s")
        row["distcls_steady_images_per_s"] = steady_rate(f"{root}/labels-{runtime}")
        rows[runtime] = row
        print(
            f"runtime {runtime}: model alone {row['model_only_images_per_s']:.1f} images/s, plain DataLoader "
            f"script {row['plain_images_per_s']:.1f}, distcls label {row['distcls_images_per_s']:.1f}",
            flush=True,
        )
    ours = rows[default_runtime]["distcls_images_per_s"]  # --runtime onnx on CPU is what auto resolves to
    torch_labels, default_labels = label_top1(f"{root}/labels-torch"), label_top1(f"{root}/labels-{default_runtime}")
    agree = float(np.mean([default_labels.get(p) == label for p, label in torch_labels.items()]))
    result = {
        "images": len(photos),
        "model": cfg.label_model,
        "default_runtime": default_runtime,
        "rows": rows,
        "decode": decode,
        "top1_agreement_default_vs_torch": agree,
        "ratio_vs_plain_torch": ours / rows["torch"]["plain_images_per_s"],
        "ratio_vs_plain_same_runtime": ours / rows[default_runtime]["plain_images_per_s"],
        "ratio_vs_ceiling_same_runtime": ours / rows[default_runtime]["model_only_images_per_s"],
    }
    same = rows[default_runtime]
    if same["plain_steady_images_per_s"]:
        result["steady_ratio_vs_plain_same_runtime"] = same["distcls_steady_images_per_s"] / same["plain_steady_images_per_s"]
    if len(photos) % 1000 == 0:  # the same ratio under a key that names the size, e.g. ..._20k for 20,000 images
        result[f"ratio_vs_plain_same_runtime_{len(photos) // 1000}k"] = result["ratio_vs_plain_same_runtime"]
    print(
        f"distcls label (default runtime {default_runtime}): {ours:.1f} images/s = "
        f"{result['ratio_vs_plain_torch']:.2f}x the plain PyTorch script, {result['ratio_vs_plain_same_runtime']:.2f}x "
        f"the same-runtime script, {result['ratio_vs_ceiling_same_runtime']:.2f}x the same-runtime model alone; "
        f"top-1 agrees with torch on {agree:.4f} of {len(torch_labels)} photos",
        flush=True,
    )
    return result
