from mateconv.evaluate.cli import main
from mateconv.terminal import run_main

run_main(main)
