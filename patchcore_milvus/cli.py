"""The `patchcore-milvus` command: ingest, query, evaluate, collections, history, rollback, drop, config show."""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import logging
import os
import sys
import tempfile
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import yaml

from patchcore_milvus import __version__
from patchcore_milvus.config import (
    PASSWORD_ENV,
    TOKEN_ENV,
    USER_ENV,
    Config,
    load_config,
    shown_uri,
)
from patchcore_milvus.errors import ImageError, ModelFileError, PatchcoreMilvusError
from patchcore_milvus.files import printable

_HINTS = typing.get_type_hints(Config)


def _flag(option: dataclasses.Field) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The command-line flag of a Config option, from its field: named after it (dashes for
    underscores) unless it says otherwise, typed after its annotation, with its help text."""
    meta = option.metadata
    name = meta["flag"] or "--" + option.name.replace("_", "-")
    kind = _HINTS[option.name]
    if meta["pairs"]:
        return click.option(
            name, option.name, multiple=True, callback=lambda c, p, v: _pairs(v), metavar="KEY=VALUE", help=meta["help"]
        )
    if kind is bool:
        name = name if "/" in name else f"{name}/--no-{name.removeprefix('--')}"
        return click.option(name, option.name, default=None, help=meta["help"])
    if meta["choices"]:
        return click.option(name, option.name, type=click.Choice(meta["choices"]), help=meta["help"])
    base = next((t for t in (int, float) if t in (kind, *typing.get_args(kind))), str)
    return click.option(name, option.name, type=base, help=meta["help"])


# Every option's flag, named after its config option; commands pick the ones they use.
_OPTIONS = {option.name: _flag(option) for option in dataclasses.fields(Config)}


def _pairs(values: tuple[str, ...]) -> dict[str, Any] | None:
    """KEY=VALUE flags -> dict, values parsed as YAML scalars (so 32 is an int); None if not given."""
    if not values:
        return None
    pairs = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}")
        pairs[key] = yaml.safe_load(value)
    return pairs


EXTRACTOR = [
    "backbone",
    "weights",
    "image_size",
    "aspect",
    "center_crop",
    "tile",
    "normalization",
    "target_dim",
    "border",
]

# Reaching Milvus.
CONNECTION = [
    "uri",
    "milvus_timeout",
    "index_timeout",
    "retry_seconds",
    "tls_ca_cert",
    "tls_client_cert",
    "tls_client_key",
    "tls_server_name",
]

# What scoring against an existing bank takes (query, evaluate).
SCORING = [
    *CONNECTION,
    *EXTRACTOR,
    "search_params",
    "image_threshold",
    "pixel_threshold",
    "reweight",
    "reweight_neighbors",
    "blur_sigma",
    "batch_size",
    "num_threads",
]


def config_options(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add `--config` and the named flags; the command receives the merged Config as `config`."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            overrides = {name: kwargs.pop(name) for name in names}
            kwargs["config"] = load_config(kwargs.pop("config_file"), **overrides)
            return command(*args, **kwargs)

        for name in reversed(names):
            wrapper = _OPTIONS[name](wrapper)
        return click.option(
            "--config",
            "config_file",
            type=click.Path(dir_okay=False),
            envvar="PATCHCORE_MILVUS_CONFIG",
            help="YAML config file (flags win over it).",
        )(wrapper)

    return decorate


# Where each command's large writes go, for the full-disk message.
_ELSEWHERE = {"ingest": "TMPDIR", "query": "--out", "evaluate": "--report", "watch": "--results", "baseline": "--out"}
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG}


def _is_storage_fault(exc: OSError) -> bool:
    """A file the system refused (disk full, read-only, not permitted), as opposed to a bug."""
    text = str(exc)  # numpy says "... requested and ... written" or "Not enough free space", without an errno
    return exc.errno in _STORAGE_ERRNOS or ("requested and" in text and "written" in text) or "free space" in text


class _Group(click.Group):
    """Prints our errors and Milvus' as one clear message, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        # Our warnings (a Milvus call being retried) are one line each; pymilvus' own tracebacks are
        # silenced where it is used (milvus/connection.py).
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("warning: %(message)s"))
        ours = logging.getLogger("patchcore_milvus")
        ours.addHandler(handler)
        ours.setLevel(logging.WARNING)
        try:
            return super().invoke(ctx)
        except PatchcoreMilvusError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.secho(
                "interrupted: nothing half-done was kept (an unfinished bank version is dropped and the "
                "previous one serves on; output files already written are complete)",
                fg="yellow",
                err=True,
            )
            sys.exit(130)
        except OSError as exc:
            if not _is_storage_fault(exc):
                raise
            command = ctx.invoked_subcommand
            where = exc.filename
            if where is None:  # a write without a name: ingest's patch features, in the temporary folder
                where = f"the temporary folder {tempfile.gettempdir()}" if command == "ingest" else "a file"
            elsewhere = _ELSEWHERE.get(command or "", "TMPDIR")
            click.secho(
                f"error: {where}: {exc.strerror or exc}. Free some space (or point {elsewhere} elsewhere) "
                "and check the permissions of that folder; outputs are written whole or not at all.",
                fg="red",
                err=True,
            )
            sys.exit(2)
        finally:
            ours.removeHandler(handler)


@click.group(cls=_Group)
@click.version_option(__version__)
def main() -> None:
    """PatchCore visual inspection with its memory banks in Milvus."""


@main.command()
@click.argument("data_root", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--category", help="Product category; also the bank's name in Milvus.")
@click.option(
    "--from-review",
    "reviewed",
    metavar="CATEGORY",
    help="Grow CATEGORY's bank with the parts found good on review (serve's page), with the bank's own "
    "settings and none held out (implies --append).",
)
@click.option(
    "--images",
    "images_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Any folder of good images, instead of DATA_ROOT/<category>/train/good.",
)
@click.option(
    "--append",
    is_flag=True,
    help="Grow the category's bank with these images (a new variant, new lighting) instead of replacing it.",
)
@config_options(
    *CONNECTION,
    "keep_versions",
    "strict",
    *EXTRACTOR,
    "coreset_ratio",
    "coreset_size",
    "projection_dim",
    "seed",
    "index_type",
    "index_params",
    "search_params",
    "holdout_ratio",
    "holdout_joins",
    "threshold_sigma",
    "reweight",
    "reweight_neighbors",
    "blur_sigma",
    "batch_size",
    "num_threads",
    "progress",
    "review_folder",
)
def ingest(
    data_root: Path | None,
    category: str | None,
    reviewed: str | None,
    images_dir: Path | None,
    append: bool,
    config: Config,
) -> None:
    """Learn CATEGORY from defect-free images and store its memory bank in Milvus."""
    from patchcore_milvus.ingest import append_to_bank, fit_bank
    from patchcore_milvus.milvus import validate_category

    if reviewed is not None:
        _append_reviewed(reviewed, category, data_root, images_dir, config)
        return
    if category is None:
        raise click.UsageError("give --category (or --from-review CATEGORY)")
    validate_category(category)
    images, root = _good_images(data_root, category, images_dir)
    summary = (append_to_bank if append else fit_bank)(category, images, config, root=root)
    click.echo("\n".join(summary.lines()))


def _good_images(data_root: Path | None, category: str, images_dir: Path | None) -> tuple[list[Path], Path]:
    """A category's good images (DATA_ROOT/<category>/train/good, or any folder), and the folder
    their names are recorded relative to; what the folder holds besides images is said."""
    from patchcore_milvus.images import scan_folder
    from patchcore_milvus.mvtec import train_folder

    if images_dir is None:
        if data_root is None:
            raise click.UsageError("give DATA_ROOT (MVTec AD layout) or --images DIR")
        images_dir, root = train_folder(data_root, category), data_root / category
    else:
        root = images_dir
    images, left_out = scan_folder(images_dir)
    _say(left_out)
    if not images:
        raise ImageError(f"no images (png, jpg, bmp, tif, webp) in {images_dir}")
    return images, root


def _append_reviewed(
    reviewed: str, category: str | None, data_root: Path | None, images_dir: Path | None, config: Config
) -> None:
    from patchcore_milvus.review import append_reviewed

    if category not in (None, reviewed):
        raise click.UsageError(f"--category {category} and --from-review {reviewed} name two categories")
    if data_root is not None or images_dir is not None:
        raise click.UsageError("--from-review takes its images from the review queue: leave out DATA_ROOT and --images")
    added, summary = append_reviewed(reviewed, config)
    click.echo("\n".join(summary.lines()))
    where = f"into {summary.collection}" if summary.search is not None else f"(already covered by {summary.collection})"
    click.echo(f"review: {len(added)} parts found good on review added {where}")


def _printable(path: Path) -> str:
    """A path on one line: a newline or another control character in a file name is escaped."""
    return printable(str(path))


def _say(warning: str | None) -> None:
    if warning:
        click.secho(warning, fg="yellow", err=True)


def _expand(inputs: tuple[Path, ...]) -> list[Path]:
    """Files as given, folders searched recursively (sorted); what a folder holds besides images is
    said on stderr."""
    from patchcore_milvus.images import IMAGE_SUFFIXES, scan_folder

    paths: list[Path] = []
    for item in inputs:
        if item.is_dir():
            if not os.access(item, os.R_OK | os.X_OK):  # rglob would find nothing and say no more
                raise ImageError(f"{item}: this user may not read the folder; check its permissions")
            found, left_out = scan_folder(item, recursive=True)
            _say(left_out)
            if not found:
                raise ImageError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {item}")
            paths.extend(found)
        else:
            paths.append(item)
    return paths


@main.command()
# readable=False: a file this user may not read is skipped with its reason and the others are
# scored (click's own check would stop the whole command before the first image).
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, readable=False, path_type=Path))
@click.option("--category", required=True, help="Which bank to score against.")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write per image: raw map (.npy), overlay (PNG), mask (PNG).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image instead of text lines.")
@config_options(*SCORING, "search")
def query(inputs: tuple[Path, ...], category: str, out_dir: Path | None, as_json: bool, config: Config) -> None:
    """Score images (files, or folders searched recursively) against CATEGORY's bank: score, verdict, map, mask."""
    from patchcore_milvus.bank import Bank
    from patchcore_milvus.files import remove_stale_temporaries
    from patchcore_milvus.images import IMAGE_SUFFIXES
    from patchcore_milvus.visualize import output_stems, write_outputs

    if out_dir is not None and out_dir.suffix.lower() in IMAGE_SUFFIXES:
        raise ImageError(f"--out names a folder for the outputs (maps, overlays, masks), not a file: {out_dir}")
    paths = _expand(inputs)
    stems = dict(zip(paths, output_stems(paths)))
    if out_dir is not None and out_dir.is_dir():
        for path in remove_stale_temporaries(out_dir):  # an earlier query killed while writing
            click.secho(f"removed {path.name}, left by an interrupted query", fg="yellow", err=True)
    bank = Bank.open(category, config)
    failed = 0
    for path, result in bank.score_paths(paths):
        if isinstance(result, ImageError):
            failed += 1
            click.secho(f"skipped {result}", fg="yellow", err=True)
            continue
        record = result.summary()
        if out_dir is not None:
            record["files"] = [str(p) for p in write_outputs(out_dir, stems[path], result)]
        if as_json:
            click.echo(json.dumps(record, allow_nan=False))
        else:
            threshold = "none" if result.image_threshold is None else f"{result.image_threshold:.3f}"
            click.echo(
                f"{_printable(path)}  score {result.image_score:.3f}  threshold {threshold}  "
                f"{result.verdict or '-'}  {sum(result.timings_ms.values()):.0f} ms"
            )
    if failed:
        click.secho(f"{failed} of {len(paths)} files could not be scored", fg="red", err=True)
        sys.exit(1)


@main.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--category", required=True, help="Which bank to score against.")
@click.option(
    "--results",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The JSON-lines file of results, one line an image; also what was scored (default: FOLDER/results.jsonl).",
)
@click.option("--sort", is_flag=True, help="Move each scored file to FOLDER/ok, defect or rejected (reason beside).")
@click.option(
    "--settle",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Seconds a file's size and time must hold still before it is taken as complete.",
)
@click.option("--interval", default=0.5, show_default=True, type=click.FloatRange(0.01), help="Seconds between looks.")
@click.option("--once", is_flag=True, help="Score what the folder holds, then stop.")
@config_options(*SCORING, "search")
def watch(
    folder: Path,
    category: str,
    results: Path | None,
    sort: bool,
    settle: float,
    interval: float,
    once: bool,
    config: Config,
) -> None:
    """Score each image written into FOLDER once, as it arrives: a hot folder for a camera or a line."""
    from patchcore_milvus.bank import Bank
    from patchcore_milvus.watch import RESULTS, WatchSettings
    from patchcore_milvus.watch import watch as watch_folder

    settings = WatchSettings(folder, results or folder / RESULTS, sort, settle, interval, once)
    bank = Bank.open(category, config)
    click.echo(f"watching {_printable(folder)} for {category} (results: {_printable(settings.results)}; Ctrl-C stops)")
    try:
        outcome = watch_folder(bank, settings, click.echo)
    except KeyboardInterrupt:
        click.echo("stopped")
        return
    click.echo(f"{outcome.scored} image{'s' if outcome.scored != 1 else ''} scored")
    if outcome.waiting:
        click.secho(f"{outcome.waiting} files were left unscored (see above); run it again", fg="red", err=True)
        sys.exit(1)


@main.command()
@click.argument("data_root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--category", "categories", multiple=True, help="Category to evaluate (repeatable).")
@click.option("--all", "all_categories", is_flag=True, help="Every category folder in DATA_ROOT that has a bank.")
@click.option(
    "--search",
    type=click.Choice(["milvus", "local", "exact", "both", "all"]),
    default="milvus",
    show_default=True,
    help="Milvus' index, a local replica (search: local), exact in-process search over the same vectors, "
    "Milvus and exact side by side (both), or all three.",
)
@click.option(
    "--report",
    "report_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write report.json, report.md and pictures here (implies --search both).",
)
@click.option(
    "--pixel-size",
    type=click.IntRange(16, 4096),
    default=256,
    show_default=True,
    help="Maps and masks are compared at this square size.",
)
@click.option(
    "--strict-masks",
    is_flag=True,
    help="Refuse defect images without a ground-truth mask (by default they count for the image metrics only).",
)
@click.option(
    "--method",
    type=click.Choice(["patchcore", "autoencoder", "gan"]),
    default="patchcore",
    show_default=True,
    help="PatchCore's bank, or a reconstruction baseline trained with `baseline fit` (needs --model-dir).",
)
@click.option(
    "--model-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="The baseline's folder (`baseline fit --out`); with several categories DIR/<category>; with --compare "
    "DIR/<method>/<category>.",
)
@click.option(
    "--compare",
    is_flag=True,
    help="PatchCore, the AutoEncoder and the GAN side by side, as the seed's table (needs --model-dir).",
)
@config_options(*SCORING, "progress")
def evaluate(
    data_root: Path,
    categories: tuple[str, ...],
    all_categories: bool,
    search: str,
    report_dir: Path | None,
    pixel_size: int,
    strict_masks: bool,
    method: str,
    model_dir: Path | None,
    compare: bool,
    config: Config,
) -> None:
    """MVTec AD metrics of banks on DATA_ROOT/<category>/test, as in the PatchCore paper's tables."""
    from patchcore_milvus.bank import Bank
    from patchcore_milvus.evaluate import CategoryEvaluation, Scorer, evaluate_baseline, evaluate_category
    from patchcore_milvus.milvus import BankStore
    from patchcore_milvus.report import summary

    if (method != "patchcore" or compare) and model_dir is None:
        raise click.UsageError("a baseline needs --model-dir: the folder `baseline fit --out` wrote")
    if compare and method != "patchcore":
        raise click.UsageError("--compare evaluates all three methods: leave out --method")
    if method != "patchcore" and not compare:
        if all_categories or not categories:
            raise click.UsageError("give --category NAME (repeatable) for a baseline")
        evaluated: list[CategoryEvaluation] = []
        scorers: dict[str, Scorer] = {}
        for category in categories:
            scorers[category] = _baseline(model_dir, method, category)
            evaluated.append(
                evaluate_baseline(
                    scorers[category], category, data_root / category, pixel_size, config.progress, strict_masks
                )
            )
        _print_evaluation(summary(evaluated), evaluated, scorers, report_dir)
        return
    store = BankStore.from_config(config, existing=True)
    if all_categories:
        banked = {bank.category for bank in store.list_banks()}
        categories = tuple(sorted(p.name for p in data_root.iterdir() if p.is_dir() and p.name in banked))
        if not categories:
            raise ImageError(f"no folder in {data_root} has a bank at {shown_uri(config.uri)}")
    if not categories:
        raise click.UsageError("give --category NAME (repeatable) or --all")
    if report_dir is not None and search not in ("both", "all"):  # a report compares with exact search
        search = "all" if search == "local" else "both"
    baselines: dict[tuple[str, str], Any] = {}
    if compare:  # every model checked before the first image is scored
        assert model_dir is not None
        for name in ("autoencoder", "gan"):
            for category in categories:
                baselines[name, category] = _baseline(model_dir / name, name, category)
    banks: dict[str, Scorer] = {}
    evaluations = []
    for category in categories:
        bank = Bank.open(category, config, store=store)
        banks[category] = bank
        evaluations.append(
            evaluate_category(bank, category, data_root / category, search, pixel_size, config.progress, strict_masks)
        )
    report = summary(evaluations)
    if compare:
        evaluated = {
            key: evaluate_baseline(model, key[1], data_root / key[1], pixel_size, config.progress, strict_masks)
            for key, model in baselines.items()
        }
        report["compare"] = _comparison(evaluations, evaluated)
    _print_evaluation(report, evaluations, banks, report_dir)


def _baseline(model_dir: Path | None, method: str, category: str) -> Any:
    """The baseline of `category`: in `model_dir`, or in DIR/<category> where DIR holds no model itself."""
    from patchcore_milvus.baseline import DESCRIPTION, Baseline

    assert model_dir is not None
    folder = model_dir if (model_dir / DESCRIPTION).is_file() else model_dir / category
    baseline = Baseline.load(folder)
    assert baseline.description is not None
    if baseline.settings.method != method:
        raise ModelFileError(f"{folder} holds the {baseline.settings.method} baseline, not the {method}")
    if baseline.description.category != category:
        raise ModelFileError(f"{folder} holds a model of {baseline.description.category!r}, not of {category!r}")
    return baseline


def _comparison(evaluations: list[Any], baselines: dict[tuple[str, str], Any]) -> dict[str, Any]:
    """The seed's table: per category, image and pixel AUROC of AE, GAN and PatchCore (Milvus search)."""
    rows = {}
    for evaluation in evaluations:
        category = evaluation.category
        patchcore = evaluation.report["search"].get("milvus") or next(iter(evaluation.report["search"].values()))
        row = {"patchcore": {k: patchcore[k] for k in ("image_auroc", "pixel_auroc")}}
        for name in ("autoencoder", "gan"):
            metrics = baselines[name, category].report["search"][name]
            row[name] = {k: metrics[k] for k in ("image_auroc", "pixel_auroc")}
        rows[category] = row
    return {"categories": rows, "baselines": {f"{n}/{c}": e.report for (n, c), e in baselines.items()}}


def _print_evaluation(
    report: dict[str, Any], evaluations: list[Any], scorers: dict[str, Any], report_dir: Path | None
) -> None:
    from patchcore_milvus.report import comparison_lines, detail_lines, table_lines, write_report

    if "compare" in report:
        click.echo("\n".join([*comparison_lines(report["compare"]), ""]))
    click.echo("\n".join([*table_lines(report), "", *detail_lines(report)]))
    if report_dir is not None:
        written = write_report(report, evaluations, scorers, report_dir)
        click.echo(f"report: {', '.join(str(p) for p in written)}")


@main.command()
@config_options(*CONNECTION)
def collections(config: Config) -> None:
    """List the banks: category, vectors, dim, index, backbone, created."""
    from patchcore_milvus.milvus import BankStore

    banks = BankStore.from_config(config, existing=True).list_banks()
    if not banks:
        click.echo(f"no banks at {shown_uri(config.uri)}")
        return
    rows = [
        [
            bank.category,
            str(bank.vectors),
            str(bank.description.extractor.dim),
            bank.description.index.type,
            bank.description.extractor.backbone,
            bank.description.created,
            bank.collection,
        ]
        for bank in banks
    ]
    _echo_table(["category", "vectors", "dim", "index", "backbone", "created", "collection"], rows)


@main.command()
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to listen on (not loopback: needs --token)."
)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="Port to listen on.")
@click.option(
    "--token",
    envvar="PATCHCORE_MILVUS_TOKEN",
    help="API token every request must send as 'Authorization: Bearer <token>' (env PATCHCORE_MILVUS_TOKEN).",
)
@click.option(
    "--category",
    "categories",
    multiple=True,
    help="Open this category's bank before answering (repeatable); others open on their first request.",
)
@click.option(
    "--queue", "queue_size", default=64, show_default=True, type=click.IntRange(1), help="Images that may wait."
)
@click.option(
    "--allowed-host",
    "allowed_hosts",
    multiple=True,
    metavar="NAME",
    help="A name browsers reach this station by, besides IP addresses, localhost and the machine's own names "
    "(repeatable); other Host headers are refused.",
)
@config_options(*SCORING, "search", "review_folder")
def serve(
    host: str,
    port: int,
    token: str | None,
    categories: tuple[str, ...],
    queue_size: int,
    allowed_hosts: tuple[str, ...],
    config: Config,
) -> None:
    """Answer inspections over HTTP: POST /v1/inspect?category=C with an image (see README)."""
    from patchcore_milvus import service

    try:
        service.serve(config, host, port, token, categories, queue_size, click.echo, allowed_hosts)
    except KeyboardInterrupt:  # uvicorn has answered the requests in flight and stopped
        click.echo("stopped")


@main.group()
def baseline() -> None:
    """The seed's reconstruction baselines (an AutoEncoder, a GAN), to compare with PatchCore."""


@baseline.command("fit")
@click.argument("data_root", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--category", required=True, help="Product category (its good images train the model).")
@click.option(
    "--images", "images_dir", type=click.Path(file_okay=False, path_type=Path), help="Any folder of good images."
)
@click.option("--method", required=True, type=click.Choice(["autoencoder", "gan"]), help="Which baseline.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for the model.")
@click.option("--image-size", default=128, show_default=True, type=click.IntRange(32, 1024), help="A multiple of 16.")
@click.option("--epochs", default=60, show_default=True, type=click.IntRange(1), help="At most this many.")
@click.option(
    "--patience",
    default=8,
    show_default=True,
    type=click.IntRange(1),
    help="Epochs without a better held-out loss before stopping.",
)
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))
@click.option("--learning-rate", type=click.FloatRange(0, min_open=True), help="Adam's (default 1e-3; the GAN 2e-4).")
@click.option(
    "--holdout-ratio", default=0.1, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True)
)
@click.option("--threshold-sigma", default=4.0, show_default=True, type=click.FloatRange(0))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**32 - 1))
@click.option("--progress/--no-progress", default=True, help="Progress bars (the loss on the training bar).")
def baseline_fit(
    data_root: Path | None,
    category: str,
    images_dir: Path | None,
    method: str,
    out: Path,
    image_size: int,
    epochs: int,
    patience: int,
    batch_size: int,
    learning_rate: float | None,
    holdout_ratio: float,
    threshold_sigma: float,
    seed: int,
    progress: bool,
) -> None:
    """Train a baseline on CATEGORY's good images (DATA_ROOT/<category>/train/good) into --out."""
    from patchcore_milvus.baseline import TrainingSettings, fit_baseline

    images, _ = _good_images(data_root, category, images_dir)
    rate = {} if learning_rate is None else {"learning_rate": learning_rate}
    settings = TrainingSettings(
        method, image_size, epochs, patience, batch_size, holdout_ratio=holdout_ratio,
        threshold_sigma=threshold_sigma, seed=seed, **rate,
    )  # fmt: skip
    description = fit_baseline(category, images, settings, out, progress).description
    assert description is not None
    training, thresholds = description.training, description.thresholds
    last = training["losses"][-1]
    click.echo(
        f"{method} for {category} -> {out}: {training['images']} images, {training['held_out']} held out; "
        f"{training['epochs']} epochs in {training['seconds']} s, the best held-out loss at epoch "
        f"{training['best_epoch']} (last: training {last['train']:.4f}, held out {last['held_out']:.4f})"
    )
    click.echo(f"thresholds: image {thresholds['image']:.4f}, pixel {thresholds['pixel']:.4f}")


@main.command()
@click.argument("category")
@config_options(*CONNECTION)
def history(category: str, config: Config) -> None:
    """List CATEGORY's bank versions, oldest first; `*` marks the one stations use."""
    from patchcore_milvus.milvus import BankStore

    versions = BankStore.from_config(config, existing=True).versions(category)
    if not versions:
        raise PatchcoreMilvusError(f"no versions of {category!r} at {shown_uri(config.uri)}")
    rows = []
    for v in versions:
        name = ("* " if v.current else "  ") + v.version
        d = v.description
        if d is None:
            rows.append([name, "incomplete (interrupted ingest)", "-", str(v.vectors), "-", "-", "-", "-"])
            continue
        rows.append(
            [
                name,
                d.created,
                str(sum(len(part.bank) for part in d.training_images)),
                str(v.vectors),
                _number(d.thresholds.image if d.thresholds else None),
                _number(d.thresholds.pixel if d.thresholds else None),
                d.extractor.backbone,
                d.origin,
            ]
        )
    _echo_table(["version", "created", "images", "vectors", "image thr", "pixel thr", "backbone", "origin"], rows)


@main.command()
@click.argument("category")
@click.argument("version", required=False)
@config_options(*CONNECTION)
def rollback(category: str, version: str | None, config: Config) -> None:
    """Point CATEGORY back at VERSION (default: the version before the current one).

    Stations pick it up before their next batch; `history` lists the versions."""
    from patchcore_milvus.milvus import BankStore

    target = BankStore.from_config(config, existing=True).rollback(category, version)
    click.echo(f"{category} -> {target}")


@main.command()
@click.option("--category", help="Only this category's leftovers (default: every category's).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@config_options(*CONNECTION)
def gc(category: str | None, yes: bool, config: Config) -> None:
    """Drop leftovers of interrupted ingests: versions that never got their description, and
    the temporary folders of this machine's ingests that were killed.

    An ingest still running also has such a version: do not run this while one is."""
    from patchcore_milvus.ingest import remove_stale_work_folders
    from patchcore_milvus.milvus import BankStore

    for folder in remove_stale_work_folders():  # this machine's, whatever the category
        click.echo(f"removed {_printable(folder)}: the patch features of an ingest that was killed")
    store = BankStore.from_config(config, existing=True)
    found = store.leftovers(category)
    if not found:
        click.echo("no leftovers")
        return
    if not yes and not click.confirm(f"drop {', '.join(found)} (no ingest must be running)?"):
        click.echo("nothing dropped")
        return
    for name in found:
        store.drop_version(name)
    click.echo(f"dropped {', '.join(found)}")


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _echo_table(columns: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    for row in [columns, *rows]:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


@main.command()
@click.argument("category")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@config_options(*CONNECTION)
def drop(category: str, yes: bool, config: Config) -> None:
    """Delete CATEGORY's bank (all its versions)."""
    from patchcore_milvus.milvus import BankStore

    store = BankStore.from_config(config, existing=True)
    store.resolve(category)
    versions = len(store.versions(category))
    question = f"delete the bank {category!r} at {shown_uri(config.uri)} ({versions} version(s), none kept)?"
    if not yes and not click.confirm(question):
        click.echo("nothing dropped")
        return
    dropped = store.drop(category)
    click.echo(f"dropped {category}: {', '.join(dropped)}")


@main.group("config")
def config_group() -> None:
    """Inspect the configuration."""


@config_group.command("show")
@config_options(*_OPTIONS)
def config_show(config: Config) -> None:
    """Print the effective configuration (defaults < config file < flags) as YAML."""
    values = config.to_dict()
    values["uri"] = shown_uri(config.uri)
    values["index_params"] = config.effective_index_params
    values["search_params"] = config.effective_search_params
    click.echo(yaml.safe_dump(values, sort_keys=False).rstrip())
    credentials = config.credentials
    if "token" in credentials:
        said = f"token from ${TOKEN_ENV} (hidden)"
    elif credentials:
        said = f"user {credentials['user']!r} from ${USER_ENV}, password from ${PASSWORD_ENV} (hidden)"
    else:
        said = f"none (set ${TOKEN_ENV}, or ${USER_ENV} and ${PASSWORD_ENV})"
    click.echo(f"# Milvus credentials: {said}")
