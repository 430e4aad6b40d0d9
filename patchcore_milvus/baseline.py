"""The reconstruction baselines, trained, saved, loaded and scored like a bank.

`fit_baseline` trains an AutoEncoder or a GAN (reconstruction.py) on a category's good images,
stops when the held-out good images stop improving, and sets the thresholds on those held-out
images exactly as an ingest does (thresholds.py). The model is a safetensors file beside a JSON
description (never a pickle). `Baseline.load` checks both; `Baseline.score_paths` answers as a
`Bank` does: image score, thresholds and an anomaly map on the original image, where the map is
each pixel's reconstruction error (mean over channels of the squared difference), Gaussian-smoothed
as PatchCore's map is, and the image score its maximum.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn
from tqdm import tqdm

from patchcore_milvus import __version__
from patchcore_milvus.bank import ScoredImage
from patchcore_milvus.errors import ImageError, ModelFileError
from patchcore_milvus.files import save_together
from patchcore_milvus.images import Preprocess, load_rgb
from patchcore_milvus.reconstruction import AutoEncoder, Discriminator, Generator
from patchcore_milvus.scoring import anomaly_map
from patchcore_milvus.thresholds import RULE, calibrate, holdout_split

METHODS = ("autoencoder", "gan")
WEIGHTS, DESCRIPTION = "model.safetensors", "model.json"
FORMAT = "patchcore-milvus reconstruction baseline"
SCHEMA = 1
# The GAN's generator loss: adversarial + this much reconstruction (GANomaly's w_con).
RECONSTRUCTION_WEIGHT = 50.0


@dataclass(frozen=True)
class TrainingSettings:
    """How a baseline is trained; every field is recorded in its description."""

    method: str
    image_size: int = 128  # a multiple of 16
    epochs: int = 60
    patience: int = 8  # epochs without a better held-out loss before stopping
    batch_size: int = 16
    learning_rate: float | None = None  # Adam's; None: 1e-3, the GAN 2e-4 (DCGAN's)
    holdout_ratio: float = 0.1
    threshold_sigma: float = 4.0
    blur_sigma: float = 4.0  # at a 256-pixel input, scaled with the size, as PatchCore's map
    seed: int = 0
    latent: int = 256  # the GAN's bottleneck


@dataclass
class BaselineDescription:
    """model.json: what the model is, how it was trained, and its thresholds."""

    method: str
    category: str
    settings: dict[str, Any]
    package_version: str
    created: str
    training: dict[str, Any]  # images, held_out, epochs, best_epoch, seconds, losses per epoch
    thresholds: dict[str, Any]  # image, pixel, rule, sigma, held_out (score, map max per image)
    weights: dict[str, Any]  # file, sha256, bytes
    format: str = FORMAT
    schema: int = SCHEMA
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _networks(settings: TrainingSettings, training: bool = True) -> dict[str, nn.Module]:
    """The model, and for a GAN in training its discriminator."""
    if settings.method == "autoencoder":
        return {"model": AutoEncoder()}
    size = settings.image_size
    generator = Generator(size, settings.latent)
    return {"model": generator, "discriminator": Discriminator(size)} if training else {"model": generator}


def _settings_digest(settings: dict[str, Any], thresholds: dict[str, Any]) -> str:
    """What the weights file records of its description: an edited model.json does not pass."""
    return hashlib.sha256(json.dumps([settings, thresholds], sort_keys=True).encode()).hexdigest()


def _preprocess(settings: TrainingSettings) -> Preprocess:
    """[0, 1] RGB at `image_size` squared (the GAN maps it to [-1, 1] itself)."""
    return Preprocess(settings.image_size, None, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def _load_all(paths: list[Path], preprocess: Preprocess, progress: bool) -> tuple[torch.Tensor, list[str]]:
    loaded, skipped = [], []
    for path in tqdm(paths, desc="images", unit="img", disable=not progress):
        try:
            loaded.append(preprocess(load_rgb(path)))
        except ImageError as exc:
            skipped.append(str(exc))
    if not loaded:
        raise ImageError(f"none of the {len(paths)} images could be used: {'; '.join(skipped[:3])}")
    return torch.from_numpy(np.stack(loaded)), skipped


def safe_open_metadata(path: Path) -> dict[str, str]:
    """The metadata a safetensors file carries in its header."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as opened:
        return opened.metadata() or {}


def _rebuild(model: nn.Module, method: str, x: torch.Tensor) -> torch.Tensor:
    """The model's reconstruction of `x` (N, 3, S, S); [0, 1] in and out (the GAN works in [-1, 1])."""
    return model(x) if method == "autoencoder" else (model(x * 2 - 1) + 1) / 2


def _learning_rate(settings: TrainingSettings) -> float:
    """Adam's rate: as given, else 1e-3, and for the GAN 2e-4 (DCGAN's)."""
    if settings.learning_rate is not None:
        return settings.learning_rate
    return 2e-4 if settings.method == "gan" else 1e-3


class _Trainer:
    """One method's training step and held-out loss, on inputs in [0, 1]."""

    def __init__(self, settings: TrainingSettings, networks: dict[str, nn.Module]):
        self.settings, self.networks = settings, networks
        rate = _learning_rate(settings)
        betas = (0.5, 0.999) if settings.method == "gan" else (0.9, 0.999)
        self.optimizers = {
            name: torch.optim.Adam(net.parameters(), lr=rate, betas=betas) for name, net in networks.items()
        }

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return _rebuild(self.networks["model"], self.settings.method, x)

    def step(self, x: torch.Tensor) -> dict[str, float]:
        """One batch; the losses it had."""
        model = self.networks["model"]
        if self.settings.method == "autoencoder":
            loss = nn.functional.mse_loss(model(x), x)
            self.optimizers["model"].zero_grad()
            loss.backward()
            self.optimizers["model"].step()
            return {"train": loss.item()}
        critic = self.networks["discriminator"]
        real = x * 2 - 1
        fake = model(real)
        ones, zeros = torch.ones(len(x), 1), torch.zeros(len(x), 1)
        d_loss = nn.functional.binary_cross_entropy(critic(real), ones) + nn.functional.binary_cross_entropy(
            critic(fake.detach()), zeros
        )
        self.optimizers["discriminator"].zero_grad()
        d_loss.backward()
        self.optimizers["discriminator"].step()
        adversarial = nn.functional.binary_cross_entropy(critic(fake), ones)
        reconstruction = nn.functional.l1_loss(fake, real)
        g_loss = adversarial + RECONSTRUCTION_WEIGHT * reconstruction
        self.optimizers["model"].zero_grad()
        g_loss.backward()
        self.optimizers["model"].step()
        with torch.no_grad():  # the same measure as the AutoEncoder's and the held-out loss
            mse = nn.functional.mse_loss((fake + 1) / 2, x).item()
        return {"train": mse, "l1": reconstruction.item(), "generator": g_loss.item(), "discriminator": d_loss.item()}

    @torch.no_grad()
    def held_out_loss(self, x: torch.Tensor) -> float:
        """Mean squared reconstruction error of the held-out good images (both methods alike)."""
        for net in self.networks.values():
            net.eval()
        errors = [float(nn.functional.mse_loss(self.reconstruct(b), b)) * len(b) for b in x.split(32)]
        for net in self.networks.values():
            net.train()
        return sum(errors) / len(x)


def fit_baseline(
    category: str, images: list[Path], settings: TrainingSettings, out: Path, progress: bool = True
) -> Baseline:
    """Train `settings.method` on good `images`, write model.safetensors and model.json into
    `out`, and return the fitted model. Seeded: the same images and settings give the same model."""
    if settings.method not in METHODS:
        raise ModelFileError(f"unknown method {settings.method!r}; use one of {', '.join(METHODS)}")
    if settings.image_size % 16 or settings.image_size < 32:
        raise ModelFileError(f"image_size must be a multiple of 16 and at least 32, got {settings.image_size}")
    if settings.epochs < 1 or settings.patience < 1 or settings.batch_size < 1:
        raise ModelFileError("epochs, patience and batch_size must be at least 1")
    settings = replace(settings, learning_rate=_learning_rate(settings))  # recorded as trained
    torch.manual_seed(settings.seed)
    preprocess = _preprocess(settings)
    train_idx, held_idx = holdout_split(len(images), settings.holdout_ratio, settings.seed)
    if len(held_idx) == 0:
        raise ModelFileError("a baseline needs held-out good images for early stopping and thresholds: give at least 2")
    started = time.perf_counter()
    train, skipped = _load_all([images[i] for i in train_idx], preprocess, progress)
    held, held_skipped = _load_all([images[i] for i in held_idx], preprocess, progress)
    networks = _networks(settings)
    trainer = _Trainer(settings, networks)
    generator = torch.Generator().manual_seed(settings.seed)
    losses: list[dict[str, float]] = []
    best, best_epoch, best_state = float("inf"), 0, None
    bar = tqdm(range(1, settings.epochs + 1), desc=f"training {settings.method}", unit="epoch", disable=not progress)
    for epoch in bar:
        order = torch.randperm(len(train), generator=generator)
        batches = [order[k : k + settings.batch_size] for k in range(0, len(train), settings.batch_size)]
        steps = [trainer.step(train[batch]) for batch in batches]
        epoch_losses = {key: float(np.mean([s[key] for s in steps])) for key in steps[0]}
        epoch_losses["held_out"] = trainer.held_out_loss(held)
        losses.append({"epoch": epoch, **{k: round(v, 6) for k, v in epoch_losses.items()}})
        bar.set_postfix(loss=f"{epoch_losses['train']:.4f}", held_out=f"{epoch_losses['held_out']:.4f}")
        if epoch_losses["held_out"] < best:
            best, best_epoch = epoch_losses["held_out"], epoch
            best_state = {k: v.detach().clone() for k, v in networks["model"].state_dict().items()}
        elif epoch - best_epoch >= settings.patience:
            break
    bar.close()
    if best_state is None:
        raise ModelFileError(
            f"training diverged: the held-out loss was {losses[-1]['held_out']} from the first epoch on; "
            "lower --learning-rate"
        )
    networks["model"].load_state_dict(best_state)
    seconds = time.perf_counter() - started
    baseline = Baseline(networks["model"].eval(), settings, preprocess, None, None)
    held_paths = [images[i] for i in held_idx]
    scored = [r for _, r in baseline.score_paths(held_paths) if isinstance(r, ScoredImage)]
    # The image score is the map's maximum, so both thresholds are one. The held-out images also
    # chose the best epoch: the thresholds may sit a little lower than on unseen good images.
    threshold = calibrate(np.array([r.image_score for r in scored]), settings.threshold_sigma)
    thresholds = {
        "image": threshold,
        "pixel": threshold,
        "rule": RULE,
        "sigma": settings.threshold_sigma,
        "held_out": [{"path": r.path, "score": round(r.image_score, 6)} for r in scored],
    }
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.contiguous() for k, v in networks["model"].state_dict().items()}
    recorded = asdict(settings)
    # One metadata key: safetensors writes several in no fixed order, and the file's bytes would differ.
    data = save(weights, metadata={"description": _settings_digest(recorded, thresholds)})
    description = BaselineDescription(
        method=settings.method,
        category=category,
        settings=recorded,
        package_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        training={
            "images": len(train),
            "held_out": len(held),
            "skipped": skipped + held_skipped,
            "epochs": len(losses),
            "best_epoch": best_epoch,
            "seconds": round(seconds, 1),
            "threads": torch.get_num_threads(),
            "losses": losses,
        },
        thresholds=thresholds,
        weights={"file": WEIGHTS, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)},
    )
    save_together(  # both files, or neither (a model retrained into the same folder included)
        [
            (out / WEIGHTS, lambda p: Path(p).write_bytes(data)),
            (out / DESCRIPTION, lambda p: Path(p).write_text(description.to_json())),
        ]
    )
    return Baseline(baseline.model, settings, preprocess, thresholds["image"], thresholds["pixel"], description)


class Baseline:
    """A trained reconstruction model, scored like a bank (`score_paths`)."""

    def __init__(
        self,
        model: nn.Module,
        settings: TrainingSettings,
        preprocess: Preprocess,
        image_threshold: float | None,
        pixel_threshold: float | None,
        description: BaselineDescription | None = None,
    ):
        self.model, self.settings, self.preprocess = model.eval(), settings, preprocess
        self.image_threshold, self.pixel_threshold = image_threshold, pixel_threshold
        self.description = description

    @classmethod
    def load(cls, folder: Path) -> Baseline:
        """The model in `folder`, checked: a damaged, altered or mismatched file is a clear error."""
        try:
            raw = json.loads((folder / DESCRIPTION).read_text())
            description = BaselineDescription(**raw)
        except FileNotFoundError:
            raise ModelFileError(
                f"no baseline in {folder} ({DESCRIPTION} missing); train one with `patchcore-milvus baseline fit`"
            ) from None
        except (OSError, ValueError, TypeError) as exc:
            raise ModelFileError(f"{folder / DESCRIPTION} is not a baseline description ({exc})") from None
        if description.format != FORMAT or description.schema != SCHEMA or description.method not in METHODS:
            raise ModelFileError(f"{folder / DESCRIPTION} describes no baseline this version reads")
        if not all(
            isinstance(part, dict) for part in (description.settings, description.thresholds, description.weights)
        ):
            raise ModelFileError(
                f"{folder / DESCRIPTION} is not a baseline description (settings, thresholds, weights)"
            )
        blob = folder / description.weights.get("file", WEIGHTS)
        try:
            data = blob.read_bytes()
        except OSError as exc:
            raise ModelFileError(f"cannot read the weights {blob}: {exc}") from None
        try:
            if hashlib.sha256(data).hexdigest() != description.weights.get("sha256"):
                raise ModelFileError(
                    f"{blob} does not match {DESCRIPTION} (damaged or replaced); train the model again"
                )
            if safe_open_metadata(blob).get("description") != _settings_digest(
                description.settings, description.thresholds
            ):
                raise ModelFileError(f"{folder / DESCRIPTION} was edited since training; train the model again")
            settings = TrainingSettings(**description.settings)
            model = _networks(settings, training=False)["model"]
            thresholds = float(description.thresholds["image"]), float(description.thresholds["pixel"])
        except (TypeError, KeyError, AttributeError, ValueError) as exc:
            raise ModelFileError(f"{folder / DESCRIPTION} is not a baseline description ({exc!r})") from None
        try:
            model.load_state_dict(load_file(blob))
        except (SafetensorError, RuntimeError, OSError) as exc:
            kind = f"a {settings.method} at {settings.image_size} px"
            raise ModelFileError(f"{blob} does not fit {kind}: {exc}") from None
        return cls(model, settings, _preprocess(settings), *thresholds, description)

    @torch.no_grad()
    def score_paths(self, paths: Iterable[Path]) -> Iterator[tuple[Path, ScoredImage | ImageError]]:
        """Score files in batches; a file that is not a usable image yields its error."""
        paths = list(paths)
        for start in range(0, len(paths), self.settings.batch_size):
            batch, images, loaded, errors = paths[start : start + self.settings.batch_size], [], [], []
            t0 = time.perf_counter()
            for path in batch:
                try:
                    image = load_rgb(path)
                    loaded.append((path, image, self.preprocess(image)))
                except ImageError as exc:
                    errors.append((path, exc))
            yield from errors
            if not loaded:
                continue
            t1 = time.perf_counter()
            x = torch.from_numpy(np.stack([array for _, _, array in loaded]))
            errors_map = ((_rebuild(self.model, self.settings.method, x) - x) ** 2).mean(dim=1).numpy()  # (N, S, S)
            t2 = time.perf_counter()
            n = len(loaded)
            for (path, image, _), error in zip(loaded, errors_map):
                t = time.perf_counter()
                amap = anomaly_map(error, self.preprocess, self.settings.blur_sigma, *image.size)
                images.append(
                    ScoredImage(
                        path=str(path),
                        image_score=float(amap.max()),
                        image_threshold=self.image_threshold,
                        pixel_threshold=self.pixel_threshold,
                        anomaly_map=amap,
                        timings_ms={
                            "load": (t1 - t0) * 1000 / n,
                            "extract": (t2 - t1) * 1000 / n,
                            "search": 0.0,
                            "post": (time.perf_counter() - t) * 1000,
                        },
                        image=image,
                    )
                )
            yield from ((Path(result.path), result) for result in images)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) the model sees every image at."""
        return self.preprocess.size
