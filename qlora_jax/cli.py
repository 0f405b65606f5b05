"""The ``qlora-jax`` command."""

import sys


def main(argv=None) -> int:
    print("qlora-jax", argv if argv is not None else sys.argv[1:])
    return 0
