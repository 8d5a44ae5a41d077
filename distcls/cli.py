"""`distcls` console script: subcommand -> one config dataclass -> one library call."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable

from distcls import DistclsError, __version__
from distcls.config import (DemoConfig, FashionMnistConfig, S3ServerConfig, add_arguments,
                            config_from_args)

Handler = Callable[[argparse.Namespace], int]


def cmd_data_fashion_mnist(args: argparse.Namespace) -> int:
    from distcls.fmnist import write_fashion_mnist

    cfg = config_from_args(FashionMnistConfig, args)
    summary = write_fashion_mnist(cfg)
    for split, counts in summary["counts"].items():
        print(f"{split}: {sum(counts.values())} images in {len(counts)} classes -> "
              f"{cfg.out.rstrip('/')}/{split}/<class>/<index>.png")
    print(f"wrote {summary['total']} PNGs in {summary['seconds']:.1f}s from {summary['source']}")
    return 0


def cmd_s3_server(args: argparse.Namespace) -> int:
    from distcls.s3server import S3Server

    cfg = config_from_args(S3ServerConfig, args)
    server = S3Server(host=cfg.host, port=cfg.port, in_process=True).start()
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


def cmd_demo(args: argparse.Namespace) -> int:
    from distcls.demo import run_demo

    run_demo(config_from_args(DemoConfig, args))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distcls",
        description="Fine-tune, evaluate, label and serve pretrained image classifiers on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"distcls {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = sub.add_parser("data", help="put a real dataset into storage (fashion-mnist)")
    data_sub = data.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    fm = data_sub.add_parser("fashion-mnist", help="Fashion-MNIST as PNGs in URI/{train,test}/<class>/",
                             description="Write Fashion-MNIST as PNGs in URI/{train,test}/<class>/<index>.png.")
    add_arguments(fm, FashionMnistConfig)
    fm.set_defaults(handler=cmd_data_fashion_mnist)

    s3 = sub.add_parser("s3-server", help="run an S3-compatible server on loopback until interrupted",
                        description="Run moto's S3-compatible server until Ctrl-C; prints AWS_ENDPOINT_URL.")
    add_arguments(s3, S3ServerConfig)
    s3.set_defaults(handler=cmd_s3_server)

    demo = sub.add_parser("demo", help="run the whole product end to end on real data (local Ray + S3)",
                          description="Fashion-MNIST into the embedded S3 server, through every job.")
    add_arguments(demo, DemoConfig)
    demo.set_defaults(handler=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except DistclsError as exc:
        print(f"distcls: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
