"""`accelerate launch -m lotus_cli.train [OPTIONS]` (or torchrun / python -m): the options of `lotus train`."""

import sys

from ..cli import app


def main() -> None:
    app(args=["train", *sys.argv[1:]], prog_name="python -m lotus_cli.train")


if __name__ == "__main__":
    main()
