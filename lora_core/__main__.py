from lora_core.cli import run

run()
