from gen.cli import run

run()
