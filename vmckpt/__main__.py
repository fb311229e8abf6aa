from vmckpt.launcher import run

run()
