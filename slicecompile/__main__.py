import argparse
import sys

from .demo import train
from .tools import tune

COMMANDS = {"demo": train.main, "tune": tune.main}


def main():
    parser = argparse.ArgumentParser(prog="python -m slicecompile")
    parser.add_argument("command", choices=COMMANDS, nargs="?", default="demo")
    args, rest = parser.parse_known_args()
    return COMMANDS[args.command](rest)


if __name__ == "__main__":
    sys.exit(main())
