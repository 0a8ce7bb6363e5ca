"""The `gen` command, the first front-end: parse arguments, call the generation core, write files, print.

main.py      the parser and one function per subcommand (gen, samplers, info, eval, prompt, bench, ...)
loop.py      generating a run: batches, progress, PNG metadata, several processes, `gen reproduce`
outputs.py   output file names, never overwriting
"""

from gen.cli.main import entry, main

__all__ = ["entry", "main"]
