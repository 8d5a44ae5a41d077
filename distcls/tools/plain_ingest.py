"""The plain baseline of `distcls bench ingest`: a PyTorch training script over packed Parquet shards, written by
hand the way a careful engineer would, run as its own process (`python -m distcls.tools.plain_ingest ...`).

- a torch.utils.data IterableDataset over the train split's (shard, row group) units: per epoch the units are
  shuffled (seeded) and dealt to the DDP ranks by rows, then to each rank's DataLoader workers (unit k::K);
  rows are shuffled within a unit;
- pyarrow reads the row groups, from S3 with pyarrow's own S3 client (S3FileSystem, AWS_ENDPOINT_URL and the
  usual credentials), locally from disk;
- PIL decodes with JPEG draft mode (DCT scaling to no less than twice the resize target, as distcls's decoder),
  then the training base transform: shorter side to resize_size, center square (torchvision's Resize +
  CenterCrop arithmetic); the batch gets distcls's random resized crop in the training process, and the model
  normalises, so both pipelines compute the very same thing;
- the same model (create_model), AdamW parameter groups (build_optimizer), batch size and threads per process
  as a `distcls train` worker; 2 workers are DDP processes (gloo), each with its own loader workers. The ranks
  stop after the same number of steps (the smallest share), as DDP requires.

Prints one JSON line: rank 0's epochs (images, seconds, data_wait_seconds), the loader workers and world size.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import tempfile
import time
from urllib.parse import urlsplit

import numpy as np
import torch
from PIL import Image

Unit = tuple[str, int, int]  # (shard path in its filesystem, row group, rows)
RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def filesystem(uri: str):
    """(pyarrow filesystem, path): pyarrow's S3 client for s3:// (endpoint and credentials from the AWS
    variables), the local disk otherwise."""
    import pyarrow.fs as pafs

    if not uri.startswith("s3://"):
        return pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    kw = {"region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kw |= {"access_key": os.environ["AWS_ACCESS_KEY_ID"], "secret_key": os.environ.get("AWS_SECRET_ACCESS_KEY", "")}
    if endpoint:
        parts = urlsplit(endpoint)
        kw |= {"endpoint_override": parts.netloc, "scheme": parts.scheme or "https"}
    return pafs.S3FileSystem(**kw), uri.removeprefix("s3://")


def list_units(data: str, split: str = "train") -> list[Unit]:
    """Every row group of <data>/<split>/*.parquet, from the Parquet footers."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs, root = filesystem(data)
    infos = fs.get_file_info(pafs.FileSelector(f"{root.rstrip('/')}/{split}"))
    units = []
    for path in sorted(i.path for i in infos if i.path.endswith(".parquet")):
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
        units += [(path, rg, meta.row_group(rg).num_rows) for rg in range(meta.num_row_groups)]
    if not units:
        raise SystemExit(f"plain_ingest: no Parquet shards under {data}/{split}; give a packed set (distcls pack)")
    return units


def deal(units: list[Unit], world: int, seed: int, epoch: int) -> list[list[Unit]]:
    """The epoch's units per rank: a seeded shuffle, each unit to the rank with the fewest rows so far."""
    order = np.random.default_rng([seed, epoch]).permutation(len(units))
    shares: list[list[Unit]] = [[] for _ in range(world)]
    rows = [0] * world
    for i in order:
        r = rows.index(min(rows))
        shares[r].append(units[i])
        rows[r] += units[i][2]
    return shares


def steps_of(share: list[Unit], loader_workers: int, batch_size: int) -> int:
    """Batches a rank's loader yields for its share (each loader worker batches its own units)."""
    slots = max(1, loader_workers)
    return sum(math.ceil(sum(u[2] for u in share[k::slots]) / batch_size) for k in range(slots))


def decode(blob: bytes, resize: int, interpolation: str = "bilinear") -> np.ndarray:
    """JPEG draft decode, shorter side to `resize`, the center square -> uint8 CHW."""
    img = Image.open(io.BytesIO(blob))
    if img.format == "JPEG":
        img.draft("RGB", (2 * resize, 2 * resize))
    img = img.convert("RGB")
    w, h = img.size
    nw, nh = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    img = img.resize((nw, nh), RESAMPLE[interpolation])
    left, top = int(round((nw - resize) / 2.0)), int(round((nh - resize) / 2.0))
    img = img.crop((left, top, left + resize, top + resize))
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


class ShardStream(torch.utils.data.IterableDataset):
    """Batches (uint8 [B,3,R,R], int64 [B]) of one rank's share of the epoch, split over the loader workers."""

    def __init__(self, data, units, resize, interpolation, batch_size, rank, world, seed, epoch):
        self.data, self.units, self.resize, self.interpolation = data, units, resize, interpolation
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world, seed
        self.epoch = epoch  # a shared multiprocessing Value: persistent workers read the current epoch
        self._fs = None

    def samples(self, mine: list[Unit], rng: np.random.Generator):
        import pyarrow.parquet as pq

        if self._fs is None:  # one S3 client per worker process, made there (never inherited)
            self._fs = filesystem(self.data)[0]
        for path, group, _rows in mine:
            with self._fs.open_input_file(path) as f:
                table = pq.ParquetFile(f).read_row_group(group, columns=["image", "label"])
            blobs = table.column("image").combine_chunks().field("bytes")
            labels = table.column("label").to_numpy()
            for i in rng.permutation(len(labels)):
                yield decode(blobs[int(i)].as_py(), self.resize, self.interpolation), labels[i]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        k, n = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = int(self.epoch.value)
        mine = deal(self.units, self.world, self.seed, epoch)[self.rank][k::n]
        images, labels = [], []
        for image, label in self.samples(mine, np.random.default_rng([self.seed, self.rank, k, epoch])):
            images.append(image)
            labels.append(label)
            if len(labels) == self.batch_size:
                yield torch.from_numpy(np.stack(images)), torch.from_numpy(np.asarray(labels, dtype=np.int64))
                images, labels = [], []
        if labels:
            yield torch.from_numpy(np.stack(images)), torch.from_numpy(np.asarray(labels, dtype=np.int64))


def one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)


def build_loader(args, units: list[Unit], spec, rank: int, epoch):
    ctx = torch.multiprocessing.get_context("spawn")  # pyarrow's S3 client is not fork-safe
    stream = ShardStream(
        args.data, units, spec.resize_size, spec.interpolation, args.batch_size, rank, args.world, args.seed, epoch
    )
    k = args.loader_workers
    return torch.utils.data.DataLoader(
        stream,
        batch_size=None,  # the dataset yields whole batches
        num_workers=k,
        persistent_workers=k > 0,
        prefetch_factor=args.prefetch if k > 0 else None,
        multiprocessing_context=ctx if k > 0 else None,
        worker_init_fn=one_thread if k > 0 else None,
    )


def train_rank(rank: int, args, port: int, out_dir: str) -> None:
    """One training process: set up, then per epoch iterate the loader and step, timing the waits."""
    from distcls.models import create_model, get_model_info, head_parameter_names
    from distcls.train.loop import build_optimizer
    from distcls.transforms import PreprocessSpec, augment_batch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.world > 1:
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.world)
    spec = PreprocessSpec.from_dict(json.loads(args.spec))
    model = create_model(args.model, args.num_classes, args.weights, spec=spec)
    head = head_parameter_names(get_model_info(args.model))
    optimizer = build_optimizer(model, "adamw", args.lr, 0.01, 0.9, head, 1.0)
    net = torch.nn.parallel.DistributedDataParallel(model) if args.world > 1 else model
    net.train()
    units = list_units(args.data)
    epoch = torch.multiprocessing.get_context("spawn").Value("i", 0)
    loader = build_loader(args, units, spec, rank, epoch)
    rng = np.random.default_rng([args.seed, rank])
    epochs = []
    for e in range(args.epochs):
        epoch.value = e
        shares = deal(units, args.world, args.seed, e)
        steps = min(steps_of(s, args.loader_workers, args.batch_size) for s in shares)
        started = waiting = time.perf_counter()
        wait, images = 0.0, 0
        for step, (x, y) in enumerate(loader):
            wait += time.perf_counter() - waiting
            if args.random_crops:
                x = augment_batch(x, spec, rng)
            loss = torch.nn.functional.cross_entropy(net(x), y, label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            images += len(y)
            if step + 1 >= steps:  # every rank takes the same number of steps
                break
            waiting = time.perf_counter()
        epochs.append({"images": images, "seconds": time.perf_counter() - started, "data_wait_seconds": wait})
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(epochs, f)
    if args.world > 1:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m distcls.tools.plain_ingest", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a packed set (folder or s3:// prefix with train/*.parquet)")
    p.add_argument("--spec", required=True, help="the preprocessing spec as JSON (PreprocessSpec.to_dict)")
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--weights", default="bundled")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--random-crops", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--world", type=int, default=1, help="training processes (DDP over gloo when > 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training process")
    p.add_argument("--loader-workers", type=int, default=2, help="DataLoader worker processes per training process")
    p.add_argument("--prefetch", type=int, default=4, help="batches each loader worker prepares ahead")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="plain-ingest-") as out_dir:
        if args.world == 1:
            train_rank(0, args, 0, out_dir)
        else:
            torch.multiprocessing.spawn(train_rank, args=(args, free_port(), out_dir), nprocs=args.world)
        with open(os.path.join(out_dir, "rank0.json")) as f:
            epochs = json.load(f)
    result = {"world": args.world, "loader_workers": args.loader_workers, "epochs": epochs}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
