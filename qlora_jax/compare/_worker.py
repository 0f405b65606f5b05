"""``python -m qlora_jax.compare._worker STACK CONFIG_JSON CHECKPOINT WORKDIR RESULT_JSON``: one stack
of the comparison in this process (``_stacks.main``)."""

import sys

from ._stacks import main

if __name__ == "__main__":
    main(sys.argv[1:])
