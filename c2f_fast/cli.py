"""The ``c2f`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_info(args: argparse.Namespace) -> int:
    import platform

    import torch

    import c2f_fast

    print(f"c2f_fast     {c2f_fast.__version__}")
    print(f"python       {platform.python_version()}")
    print(f"torch        {torch.__version__}")
    try:
        import triton

        print(f"triton       {triton.__version__}")
    except ImportError:
        print("triton       not installed (the fast path falls back to the references)")
    try:
        import nvidia.dali as dali

        print(f"nvidia-dali  {dali.__version__}")
    except ImportError:
        print("nvidia-dali  not installed (data.loader=auto uses 'nvjpeg' on CUDA, 'torch' otherwise)")
    if torch.cuda.is_available():
        print(f"device       {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    else:
        print("device       CPU only (Triton kernels run only under TRITON_INTERPRET=1)")
    from c2f_fast.runtime import tune_allocator

    print(f"memory       {tune_allocator().removeprefix('allocator: ')}")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from c2f_fast.data import make_synthetic

    import time

    t0 = time.perf_counter()
    root = make_synthetic(
        args.out, preset=args.preset, n_train=args.n_train, n_test=args.n_test, image_size=args.image_size,
        num_classes=args.num_classes, seed=args.seed,
    )
    print(f"synthetic VOC-layout dataset ({args.preset} preset) at {root} ({time.perf_counter() - t0:.1f} s)")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from c2f_fast.demo import run_demo, summary_text

    summary = run_demo(args.out, args.overrides, aligned=args.aligned)
    print(summary_text(summary))
    return 0


def _cmd_visualize(args: argparse.Namespace) -> int:
    from c2f_fast.checkpoint import load_model
    from c2f_fast.visualize import attention_figure, boxes_from_run

    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        raise CLIError(f"no such image file: {missing[0]}")
    model, meta = load_model(args.checkpoint, which=args.weights)
    images = [str(p) for p in args.images]
    boxes = boxes_from_run(args.checkpoint, images)
    out = attention_figure(model, images, meta["class_names"], args.out, boxes=boxes)
    print(f"wrote {out}")
    return 0


def _cmd_ablate(args: argparse.Namespace) -> int:
    from c2f_fast.ablate import ablation_markdown, run_ablation

    rows = run_ablation(args.config, args.overrides, rows=args.rows, features=args.features)
    print(ablation_markdown(rows))
    return 0


def _cmd_cache_features(args: argparse.Namespace) -> int:
    from c2f_fast.config import load_config
    from c2f_fast.features import cache_features

    cfg = load_config(args.config, args.overrides)
    summary = cache_features(cfg, args.out, views=args.views, dtype=args.dtype, shard_size=args.shard_size,
                             batch_size=args.batch_size, progress=cfg.run.progress)
    print(f"wrote {summary['shards_written']} shard(s) to {summary['out']} in {summary['seconds']:.1f} s "
          f"({summary['images']['train']} train x {max(1, args.views)} view(s), {summary['images']['test']} test); "
          f"train from it with: c2f train ... optim.freeze_encoder=true data.features={summary['out']}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from c2f_fast.config import load_config
    from c2f_fast.runtime import CONFIG_FILE
    from c2f_fast.train import TrainingInterrupted, train

    config = args.config
    if args.resume is not None and args.resume is not True:  # --resume RUN_DIR
        run_dir = Path(args.resume)
        if config is None:
            config = run_dir / CONFIG_FILE
            if not config.is_file():
                raise CLIError(f"--resume: no {CONFIG_FILE} in {run_dir}")
        args.overrides = [*args.overrides, f"run.out={run_dir}"]
    cfg = load_config(config, args.overrides)
    try:
        train(cfg, resume=True if args.resume is not None else None)  # else run.resume (default auto)
    except TrainingInterrupted as exc:
        print(f"c2f train: {exc}", file=sys.stderr)
        return 128 + int(exc.signum)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from c2f_fast.evaluate import evaluate_checkpoint
    from c2f_fast.train import format_table

    overrides = list(args.overrides)
    for flag, key in ((args.data, "data.root"), (args.format, "data.format"), (args.split, "data.test_split"),
                      (args.loader, "data.loader"), (args.batch_size, "data.batch_size"),
                      (args.device, "run.device")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    metrics = evaluate_checkpoint(args.checkpoint, overrides, which=args.weights)
    print(format_table(metrics, title=f"test metrics of {args.checkpoint}"))
    if args.json is not None:
        args.json.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from c2f_fast.checkpoint import add_checkpoint_arguments
    from c2f_fast.data.base import BACKENDS

    parser = argparse.ArgumentParser(prog="c2f", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="versions and the device the fast path would use")
    info.set_defaults(func=_cmd_info)

    synth = sub.add_parser("synth", help="write the built-in synthetic multi-label set (VOC layout)")
    synth.add_argument("out", type=Path, help="output folder")
    synth.add_argument("--preset", choices=("demo", "hard"), default="hard",
                       help="demo: larger objects, fewer distractors (c2f demo); hard: small objects (c2f ablate)")
    synth.add_argument("--n-train", type=int, default=None, help="default: the preset's")
    synth.add_argument("--n-test", type=int, default=None, help="default: the preset's")
    synth.add_argument("--image-size", type=int, default=None, help="default: 128")
    synth.add_argument("--num-classes", type=int, default=None, help="default: 20")
    synth.add_argument("--seed", type=int, default=None, help="default: 0")
    synth.set_defaults(func=_cmd_synth)

    train = sub.add_parser(
        "train", help="train (and evaluate every epoch) from a YAML config",
        description="Train a model as the YAML config says, with dotted KEY=VALUE overrides "
                    "(e.g. optim.lr=1e-3 data.batch_size=64). Under torchrun --nproc_per_node N it "
                    "trains with DistributedDataParallel. A run.out that holds a checkpoint of the same config is "
                    "continued (run.resume=auto, the default), so a restarted job (torchrun --max-restarts) "
                    "picks up where it stopped.",
        epilog="examples:\n  c2f train --config configs/synthetic_small.yaml run.out=runs/try1\n"
               "  c2f train --resume runs/try1\n"
               "  torchrun --nproc_per_node 8 --max-restarts 3 -m c2f_fast.cli train --config configs/voc07.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--config", type=Path, help="YAML config (sections model, data, optim, run)")
    train.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN_DIR",
                       help="continue from the checkpoint in run.out (or in RUN_DIR, with its config.yaml); "
                            "fail if there is none (run.resume=must)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=1e-3")
    train.set_defaults(func=_cmd_train)

    ev = sub.add_parser("eval", help="evaluate a trained model on a test split (metrics, pointing game)",
                        description="Evaluate what c2f train wrote (a run folder, a .safetensors file with "
                                    "its model.json, or a checkpoint.pt) on the run's test split or another "
                                    "data set, with greedy decoding.")
    add_checkpoint_arguments(ev)
    ev.add_argument("--data", help="data root (default: the run's data.root)")
    ev.add_argument("--format", choices=("synthetic", "voc", "coco", "list"), help="data format")
    ev.add_argument("--split", help="test split name or list file")
    ev.add_argument("--loader", choices=BACKENDS)
    ev.add_argument("--batch-size", type=int)
    ev.add_argument("--device", choices=("auto", "cpu", "cuda"))
    ev.add_argument("--json", type=Path, help="also write the metrics to this JSON file")
    ev.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (data.*, run.*)")
    ev.set_defaults(func=_cmd_eval)

    demo = sub.add_parser(
        "demo", help="learn the built-in set in minutes on a CPU: metrics, curves, attention maps",
        description="Build the demo synthetic set once (cached), train lstm_lg with the max-margin loss on the "
                    "tiny backbone through the training engine, evaluate it (metrics, pointing game) and draw "
                    "the attention maps. Writes everything under runs/demo/. Uses the GPU when there is one.")
    demo.add_argument("--out", type=Path, default=None, help="run folder (default: runs/demo; runs/demo-aligned with --aligned)")
    demo.add_argument("--aligned", action="store_true",
                      help="with the decoder options that align each step's local attention with the class it "
                           "emits (glimpse supervision, the fed token in the query, the glimpse's logits in the "
                           "prediction, a stronger vertical margin; docs/model.md)")
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of the demo's config")
    demo.set_defaults(func=_cmd_demo)

    vis = sub.add_parser("visualize", help="draw the attention maps of images (the paper's Fig. 3)",
                         description="For each image: the global attention and each decoder step's local "
                                     "attention, upsampled and laid over the image, with the class emitted at "
                                     "each step and its probability. When the checkpoint is in a run folder whose "
                                     "test split has boxes for an image, each step's panel outlines the box of "
                                     "the class that step emitted.")
    add_checkpoint_arguments(vis)
    vis.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    vis.add_argument("--out", type=Path, default=Path("attention.png"), help="PNG file (default attention.png)")
    vis.set_defaults(func=_cmd_visualize)

    abl = sub.add_parser("ablate", help="train the rows of the paper's Table II under one budget, one table",
                         description="Train VGG, VGG+LSTM, VGG+LSTM+L, VGG+LSTM+L/G and VGG+LSTM+L/G+MM from the "
                                     "same config and write one table (JSON + Markdown) in the layout of the "
                                     "paper's Table II, with mAP and the pointing game. Default: the hard "
                                     "synthetic set on the tiny backbone (~30 min on 2 CPU cores).")
    abl.add_argument("--config", type=Path, default=None, help="YAML config (default: the built-in hard-set budget)")
    abl.add_argument("--rows", nargs="+", choices=("vgg", "lstm", "lstm_l", "lstm_lg", "lstm_lg_mm"),
                     help="only these rows")
    abl.add_argument("--features", type=Path, default=None, metavar="DIR",
                     help="train every row on this feature cache (c2f cache-features), the encoder frozen")
    abl.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    abl.set_defaults(func=_cmd_ablate)

    from c2f_fast.features import DEFAULT_DTYPE, DEFAULT_SHARD_SIZE, DTYPES

    cache = sub.add_parser(
        "cache-features", help="run the frozen encoder once over the train and test splits, for data.features",
        description="Compute the encoder's outputs (a [N, L, D] and f_fc [N, F]) of the config's model over its "
                    "train and test splits and store them as memory-mapped shards with a manifest. A rerun "
                    "finishes a cache cut short. Train from it with c2f train ... optim.freeze_encoder=true "
                    "data.features=DIR (docs/features.md: when a cache is valid).",
        epilog="example:\n  c2f cache-features --config configs/voc07.yaml --out cache/voc07-vgg16\n"
               "  c2f train --config configs/voc07.yaml optim.freeze_encoder=true data.features=cache/voc07-vgg16",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    cache.add_argument("--config", type=Path, help="YAML config (its model and data sections)")
    cache.add_argument("--out", type=Path, required=True, help="cache folder (new, or a cache to finish)")
    cache.add_argument("--views", type=int, default=0, metavar="K",
                       help="K augmented views per training image (random-resized crop + flip, fixed seeds); "
                            "default 0: the evaluation view")
    cache.add_argument("--dtype", choices=list(DTYPES), default=DEFAULT_DTYPE,
                       help=f"storage precision (default {DEFAULT_DTYPE}; fp32: full precision, twice the disk)")
    cache.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, metavar="N",
                       help=f"images per shard file (default {DEFAULT_SHARD_SIZE}; a multiple of the batch size)")
    cache.add_argument("--batch-size", type=int, default=None, metavar="N",
                       help="images per encoder batch (default: data.eval_batch_size or data.batch_size)")
    cache.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="config overrides, e.g. model.pretrained=imagenet")
    cache.set_defaults(func=_cmd_cache_features)

    from c2f_fast.export import add_export_arguments
    from c2f_fast.infer import add_predict_arguments

    add_predict_arguments(sub.add_parser(
        "predict", help="labels and scores of image files with a trained model",
        description="Predict the labels of image files (greedy decoding). An unreadable image is reported on "
                    "its own line and the others are still predicted; the exit status is then 1."))
    add_export_arguments(sub.add_parser(
        "export", help="export the whole model (onnx, torchscript, exported) and check the file against it",
        description="Export the model, greedy decoding included, load the file back, compare its scores with "
                    "the module's on real or random images, and keep the file only if they agree."))
    return parser


class CLIError(Exception):
    """A usage error: printed as ``c2f <command>: message``, exit status 2."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from c2f_fast.runtime import tune_allocator

    tune_allocator()  # every command: keep freed memory for reuse (runtime.tune_allocator says why)
    from c2f_fast.checkpoint import CheckpointError
    from c2f_fast.config import ConfigError
    from c2f_fast.data.images import BadImageError
    from c2f_fast.deps import MissingPackageError

    try:
        return args.func(args)
    except (CLIError, ConfigError, CheckpointError, BadImageError, FileNotFoundError, FileExistsError,
            ValueError, MissingPackageError) as exc:
        print(f"c2f {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
