from mateconv.serve.cli import main
from mateconv.terminal import run_main

run_main(main)
