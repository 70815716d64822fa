import os
import sys

from lora_core.cli import main

try:
    code = main()
    sys.stdout.flush()
except BrokenPipeError:
    # The reader went away (`... | head`): say nothing more; Python's own flush at exit would
    # raise again on the closed pipe, so stdout points at /dev/null from here on.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    code = 1
sys.exit(code)
