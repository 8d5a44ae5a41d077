"""`distcls soup`: model soups (Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned
models improves accuracy without increasing inference time").

A soup is one checkpoint whose weights are the elementwise mean of several fine-tuned checkpoints (the
ingredients), e.g. the trials of a hyperparameter search. It costs nothing at inference time: it is one model.

- uniform: the mean of every ingredient.
- greedy (the paper's Algorithm 1): ingredients sorted by their own validation accuracy, best first; the soup
  starts as the best one, and each next ingredient is kept only if adding it makes the soup's validation
  accuracy rise (strictly). The greedy soup is never worse on validation than the best ingredient.

Averaging only works for models in one basin of the loss landscape: checkpoints of one architecture fine-tuned
from the same pretrained weights, on the same classes in the same order, seeing images preprocessed the same
way. Anything else averages unrelated weights into noise, so it is refused, one line per cause.

Every candidate soup is scored with a plain forward pass over validation images decoded once into memory
(uint8 NCHW at the checkpoint's eval size); no Ray for per-object data (packed data streams in through Ray Data).
The written soup is a new model, so its temperature and "unknown" threshold are fitted anew on the same images
(distcls.calibrate, on Ray Data) and recorded with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from distcls import DistclsError, storage
from distcls.calibrate import CalibrationFailed, calibrate_best_checkpoint
from distcls.checkpoint import META, checkpoint_id, load_checkpoint, read_meta, save_checkpoint
from distcls.config import SoupConfig
from distcls.datasets import ErrorTally
from distcls.device import DevicePolicy
from distcls.infer import is_export
from distcls.models import Classifier
from distcls.splits import HELD_OUT_SPLITS, LabeledSplit, open_labeled
from distcls.train.resume import SPEC_FIELDS_COMPARED
from distcls.transforms import PreprocessSpec

State = dict[str, torch.Tensor]


@dataclass
class Ingredient:
    uri: str
    meta: dict
    state: State  # the network's state dict, on the CPU
    val_accuracy: float = 0.0


@dataclass
class ValImages:
    """The validation set decoded once: uint8 NCHW images at the eval size and their integer labels."""

    images: np.ndarray
    labels: np.ndarray
    data: LabeledSplit
    skipped: ErrorTally


def average_state_dicts(states: list[State]) -> State:
    """The elementwise mean of `states` (accumulated in float64, cast back to each tensor's dtype); tensors
    that are not floating point (e.g. BatchNorm's num_batches_tracked) are taken from the first."""
    if not states:
        raise ValueError("average_state_dicts needs at least one state dict")
    out = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            total = sum(s[key].detach().to(torch.float64) for s in states)
            out[key] = (total / len(states)).to(first.dtype)
        else:
            out[key] = first.detach().clone()
    return out


def check_compatible(uri: str, meta: dict, first_uri: str, first: dict) -> None:
    """One line, when `uri` cannot be averaged with the first ingredient `first_uri`."""
    if is_export(meta):
        export = meta["export"] if isinstance(meta.get("export"), dict) else {}
        source = export.get("source_checkpoint")
        raise DistclsError(
            f"soup: {uri} is a {export.get('format', 'model')} export, which has no weights to average; "
            f"pass the PyTorch checkpoint it was exported from{f' ({source})' if source else ''}"
        )
    if meta["architecture"] != first["architecture"]:
        raise DistclsError(
            f"soup: {uri} is a {meta['architecture']} checkpoint, {first_uri} is {first['architecture']}; soup "
            "checkpoints of one architecture (fine-tuned from the same pretrained weights)"
        )
    if list(meta["class_names"]) != list(first["class_names"]):
        raise DistclsError(
            f"soup: {uri} has classes {meta['class_names'][:5]}... ({len(meta['class_names'])}), {first_uri} has "
            f"{first['class_names'][:5]}... ({len(first['class_names'])}); soup checkpoints fine-tuned on the same "
            "classes, in the same order"
        )
    spec, spec0 = meta["preprocessing"], first["preprocessing"]
    differ = [f"{k} {spec.get(k)} vs {spec0.get(k)}" for k in SPEC_FIELDS_COMPARED if spec.get(k) != spec0.get(k)]
    if differ:
        raise DistclsError(
            f"soup: {uri} preprocesses images unlike {first_uri} ({'; '.join(differ)}); soup checkpoints trained "
            "with the same input size, resize, mean/std and interpolation"
        )


def load_ingredients(uris: tuple[str, ...], device: torch.device) -> tuple[Classifier, list[Ingredient]]:
    """(a working model on `device`, built as the first ingredient, and every ingredient's verified weights
    on the CPU). All metadata is checked before any weights are read."""
    metas = [read_meta(uri) for uri in uris]
    for uri, meta in zip(uris, metas):
        check_compatible(uri, meta, uris[0], metas[0])
    working, ingredients = None, []
    for uri in uris:
        model, meta = load_checkpoint(uri, "cpu")  # refuses weights whose sha256 differs from the record
        if working is None:  # the first one's preprocessing spec goes into the soup
            working = model
        ingredients.append(Ingredient(uri, meta, {k: v.detach().clone() for k, v in model.net.state_dict().items()}))
    return DevicePolicy.of(device).place(working).eval(), ingredients


def load_val_images(data: str, class_names: list[str], spec: PreprocessSpec) -> ValImages:
    """Every decodable image of `data` in memory (error rows counted and dropped)."""
    split = open_labeled(data, class_names, HELD_OUT_SPLITS)
    tally, images, labels = ErrorTally(), [], []
    for batch in split.iter_decoded(spec):
        batch = tally.drop_errors(batch)
        images.append(batch["image"])
        labels.append(np.asarray(batch["label"], dtype=np.int64))
    size = spec.image_size
    val = ValImages(
        np.concatenate(images) if images else np.zeros((0, 3, size, size), np.uint8),
        np.concatenate(labels) if labels else np.zeros(0, np.int64),
        split,
        tally,
    )
    if tally.count:
        print(f"soup: skipped {tally.count} undecodable images of {data} (e.g. {'; '.join(tally.examples[:2])})", flush=True)
    if not len(val.labels):
        raise DistclsError(f"soup: {data} holds no decodable labeled images to score the soups on; pass validation data")
    return val


def score(model: Classifier, state: State, val: ValImages, batch_size: int) -> float:
    """Validation accuracy of `model` with the weights `state` (loaded into it)."""
    model.net.load_state_dict(state, strict=True)
    model.eval()
    policy = DevicePolicy.of(next(model.parameters()).device)
    hits = 0
    with torch.inference_mode():
        for start in range(0, len(val.labels), batch_size):
            logits = policy.infer(model, policy.images(val.images[start : start + batch_size]))
            hits += int((logits.argmax(1).cpu().numpy() == val.labels[start : start + batch_size]).sum())
    return hits / len(val.labels)


def greedy_soup(model: Classifier, ranked: list[Ingredient], val: ValImages, batch_size: int) -> tuple[list[Ingredient], float]:
    """(the kept ingredients, the soup's accuracy): `ranked` best first, each kept only if accuracy rises."""
    kept, best = [ranked[0]], ranked[0].val_accuracy
    for candidate in ranked[1:]:
        acc = score(model, average_state_dicts([i.state for i in [*kept, candidate]]), val, batch_size)
        if acc > best:
            kept, best = [*kept, candidate], acc
    return kept, best


def resolve_device(use_gpu: bool) -> torch.device:
    if use_gpu and not torch.cuda.is_available():  # checked here: validating a config never probes CUDA
        raise DistclsError("soup: --use-gpu, but no CUDA GPU is visible to PyTorch on this machine; drop --use-gpu")
    return torch.device("cuda" if use_gpu else "cpu")


def soup_record(cfg: SoupConfig, ingredients: list[Ingredient], kept: list[Ingredient], uniform: float, greedy: float) -> dict:
    kept_uris = {i.uri for i in kept}
    return {
        "method": cfg.method,
        "data": cfg.data,
        "ingredients": [
            {"uri": i.uri, "checkpoint_id": checkpoint_id(i.meta), "val_accuracy": i.val_accuracy, "kept": i.uri in kept_uris}
            for i in ingredients
        ],
        "uniform_val_accuracy": uniform,
        "greedy_val_accuracy": greedy,
    }


def run_soup(cfg: SoupConfig) -> dict:
    """Average cfg.checkpoints into a calibrated checkpoint at cfg.out; -> checkpoint, val_accuracy, kept, method,
    ingredients, uniform/greedy_val_accuracy, val_samples, calibration (None when it could not be fitted)."""
    if storage.exists(storage.join_uri(cfg.out, META)):
        raise DistclsError(f"soup: {cfg.out} already holds a model ({META}); choose a new --out")
    device = resolve_device(cfg.use_gpu)
    model, ingredients = load_ingredients(cfg.checkpoints, device)
    meta0 = ingredients[0].meta
    val = load_val_images(cfg.data, meta0["class_names"], PreprocessSpec.from_dict(meta0["preprocessing"]))
    for ingredient in ingredients:
        ingredient.val_accuracy = score(model, ingredient.state, val, cfg.batch_size)
    uniform = score(model, average_state_dicts([i.state for i in ingredients]), val, cfg.batch_size)
    ranked = sorted(ingredients, key=lambda i: -i.val_accuracy)  # stable: ties keep the order given
    greedy_kept, greedy = greedy_soup(model, ranked, val, cfg.batch_size)
    kept, accuracy = (greedy_kept, greedy) if cfg.method == "greedy" else (ingredients, uniform)
    record = soup_record(cfg, ingredients, kept, uniform, greedy)
    for i in record["ingredients"]:
        print(f"soup: {i['uri']}: val_accuracy {i['val_accuracy']:.4f}, {'kept' if i['kept'] else 'skipped'}", flush=True)
    print(
        f"soup: uniform ({len(ingredients)} ingredients) val_accuracy {uniform:.4f}; greedy ({len(greedy_kept)} of "
        f"{len(ingredients)}) {greedy:.4f}; writing the {cfg.method} soup, on {len(val.labels)} images of {cfg.data}",
        flush=True,
    )
    model.net.load_state_dict(average_state_dicts([i.state for i in kept]), strict=True)
    storage.ensure_bucket(cfg.out)
    save_checkpoint(
        cfg.out,
        model,
        meta0["class_names"],
        metrics={"val_accuracy": accuracy, "val_samples": len(val.labels)},
        config=meta0.get("config", {}),
        extra={"soup": record},
    )
    try:
        calibration = calibrate_best_checkpoint(cfg.out, val.data, cfg.data, num_gpus=1 if cfg.use_gpu else 0)
    except CalibrationFailed as exc:  # the soup is written and good: say how to calibrate it later
        print(f"calibration: {exc}", flush=True)
        calibration = None
    print(f"wrote {cfg.out} (model {checkpoint_id(read_meta(cfg.out))[:12]}..., {cfg.method} soup of {len(kept)})", flush=True)
    return {
        "checkpoint": cfg.out,
        "val_accuracy": accuracy,
        "kept": [i.uri for i in kept],
        "val_samples": len(val.labels),
        "calibration": calibration,
        **record,
    }
