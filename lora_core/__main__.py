import sys

from lora_core.cli import main

sys.exit(main())
