"""Interactive streaming chat with a saved model (see docs/inference.md): python scripts/chat.py --model_path out/sft/final"""
from mateconv.chat import main
from mateconv.terminal import run_main

if __name__ == "__main__":
    run_main(main)
