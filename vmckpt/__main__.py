from vmckpt.cli import run

run()
