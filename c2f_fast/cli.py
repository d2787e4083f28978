"""The ``c2f`` command line."""

from __future__ import annotations

import argparse
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
        print("nvidia-dali  not installed (use the 'torch' loader backend)")
    if torch.cuda.is_available():
        print(f"device       {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    else:
        print("device       CPU only (Triton kernels run only under TRITON_INTERPRET=1)")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from c2f_fast.data import make_synthetic

    root = make_synthetic(
        args.out, n_train=args.n_train, n_test=args.n_test, image_size=args.image_size,
        num_classes=args.num_classes, seed=args.seed,
    )
    print(f"synthetic VOC-layout dataset at {root}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="c2f", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="versions and the device the fast path would use")
    info.set_defaults(func=_cmd_info)

    synth = sub.add_parser("synth", help="write the built-in synthetic multi-label set (VOC layout)")
    synth.add_argument("out", type=Path, help="output folder")
    synth.add_argument("--n-train", type=int, default=2000)
    synth.add_argument("--n-test", type=int, default=500)
    synth.add_argument("--image-size", type=int, default=128)
    synth.add_argument("--num-classes", type=int, default=20)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=_cmd_synth)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
