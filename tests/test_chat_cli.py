"""Streaming chat: the interactive terminal loop driven through real pipes, one-shot modes, history handling."""
from __future__ import annotations

import io
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from mateconv.chat import (ChatError, ChatSession, SamplingOptions, build_parser, fit_history, load_model, main,
                           run_interactive, seed_main, stream_reply)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny model on 2 shared cores: one thread is fastest
GREEDY = ["--temperature", "0", "--max_new_tokens", "24"]
QUESTION = "What is 3 plus 4?"
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def expected(tiny_sft_model, greedy_reply) -> str:
    """The SFT model's greedy reply to QUESTION, computed in process (several tokens, then EOS)."""
    text, tokens, ended = greedy_reply(tiny_sft_model, QUESTION)
    assert ended and tokens >= 2, (text, tokens)
    return text


@pytest.fixture(scope="module")
def chat_command(tiny_sft_model):
    """`chat_command(*flags)` -> scripts/chat.py on the SFT model."""
    def command(*args: str) -> list[str]:
        return [sys.executable, str(ROOT / "scripts" / "chat.py"), "--model_path", str(tiny_sft_model), *args]
    return command


class Reader:
    """Collects a pipe's output on a thread so the test can wait for text while the process keeps running."""

    def __init__(self, stream):
        self.chunks: queue.Queue[str] = queue.Queue()
        self.text = ""
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:
        while chunk := os.read(stream.fileno(), 4096):
            self.chunks.put(chunk.decode("utf-8", errors="replace"))

    def drain(self, quiet_s: float) -> None:
        """Takes in what arrives until nothing has come for `quiet_s` seconds."""
        try:
            while True:
                self.text += self.chunks.get(timeout=quiet_s)
        except queue.Empty:
            pass

    def wait_for(self, needle: str, count: int = 1, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while self.text.count(needle) < count:
            try:
                self.text += self.chunks.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"{needle!r} did not appear; output so far: {self.text!r}") from None
        return self.text


def test_interactive_session_over_pipes(chat_command, expected):
    process = subprocess.Popen(chat_command(*GREEDY), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=ENV)
    try:
        out, err = Reader(process.stdout), Reader(process.stderr)
        out.wait_for(">>> ")
        process.stdin.write(f"{QUESTION}\n".encode())
        process.stdin.flush()
        # the reply arrives while the process is still waiting for the next line: a live, interactive session
        text = out.wait_for(">>> ", count=2).split(">>> ")
        assert text[1].strip() == expected  # the reply to the first question
        assert process.poll() is None
        process.stdin.write(f"/reset\n{QUESTION}\n/exit\n".encode())
        process.stdin.flush()
        assert process.wait(timeout=60) == 0, err.text
        out.wait_for(expected, count=2)  # after the reset the same question gets the same (greedy) reply
        assert "(conversation cleared)" in out.text
    finally:
        if process.poll() is None:
            process.kill()


def test_ctrl_c_stops_a_reply_not_the_chat(tiny_untrained_model):
    # an untrained model with a long context rambles on: long enough to be interrupted mid-reply
    command = [sys.executable, str(ROOT / "scripts" / "chat.py"), "--model_path", str(tiny_untrained_model),
               "--max_new_tokens", "900", "--temperature", "1.0", "--seed", "0"]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    try:
        out, err = Reader(process.stdout), Reader(process.stderr)
        for asked in range(1, 6):
            out.wait_for(">>> ", count=asked)
            process.stdin.write(b"tell me everything\n")
            process.stdin.flush()
            while not out.text.split(">>> ")[-1]:  # wait until the reply streams
                out.text += out.chunks.get(timeout=60)
            # Freeze the chat, then see whether the reply is still going: on a busy machine it may have ended before
            # the test got here, and Ctrl-C at the prompt is not what this test is about. Then ask again.
            process.send_signal(signal.SIGSTOP)
            out.drain(quiet_s=0.5)
            if out.text.count(">>> ") == asked:
                break
            process.send_signal(signal.SIGCONT)
        else:
            raise AssertionError("every reply ended before it could be interrupted")
        process.send_signal(signal.SIGINT)  # delivered when the process runs again: in the middle of the reply
        process.send_signal(signal.SIGCONT)
        out.wait_for(" (interrupted)")
        out.wait_for(">>> ", count=asked + 1)
        process.stdin.write(b"/exit\n")
        process.stdin.flush()
        assert process.wait(timeout=60) == 0, err.text
    finally:
        if process.poll() is None:
            process.kill()


def test_one_shot_prompt_from_stdin(chat_command, expected):
    piped = subprocess.run(chat_command(*GREEDY, "--prompt", "-"), input=f"{QUESTION}\n", capture_output=True,
                           text=True, timeout=60, env=ENV)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.strip() == expected
    assert piped.stderr == ""  # loading a model draws no progress bar


def test_one_shot_prompt_flag(tiny_sft_model, expected, capsys):
    main(["--model_path", str(tiny_sft_model), *GREEDY, "--prompt", QUESTION, "--device", "cpu", "--compile", "0"])
    assert capsys.readouterr().out == f"{expected}\n"


def test_the_default_reply_length_fits_a_short_context(tiny_sft_model, expected, capsys):
    """The tiny models have a 96-token context: with no --max_new_tokens the reply takes what the context leaves
    (before: "max_new_tokens 256 leaves no room for a prompt" on every turn); a given one that cannot fit still says
    so."""
    main(["--model_path", str(tiny_sft_model), "--temperature", "0", "--prompt", QUESTION, "--device", "cpu"])
    assert capsys.readouterr().out == f"{expected}\n"
    with pytest.raises(SystemExit) as error:
        main(["--model_path", str(tiny_sft_model), "--max_new_tokens", "256", "--prompt", QUESTION])
    assert str(error.value) == "chat: max_new_tokens 256 leaves no room for a prompt in the context of 96 tokens"
    with pytest.raises(SystemExit) as error:
        main(["--model_path", str(tiny_sft_model), "--prompt", "seven " * 200, "--device", "cpu"])
    message = str(error.value)
    assert message.startswith("chat: the prompt is ") and "at most 95 fit in the context of 96" in message


def test_compile_flag_of_chat_and_serve(capsys):
    from mateconv.serve.cli import build_parser as serve_parser

    for parser in (build_parser(), serve_parser()):
        assert [parser.parse_args(["--compile", word]).compile for word in ("auto", "1", "off")] == [None, True, False]
        assert parser.parse_args([]).compile is None
        with pytest.raises(SystemExit):
            parser.parse_args(["--compile", "maybe"])
        assert "argument --compile: expected auto, 1 or 0, got 'maybe'" in capsys.readouterr().err


def test_serve_port_out_of_range_is_one_line(tmp_path):
    """Checked before the model loads (before: uvicorn's OverflowError traceback once the model had loaded)."""
    from mateconv.serve.cli import main as serve_main

    with pytest.raises(SystemExit) as error:
        serve_main(["--model_path", str(tmp_path), "--port", "99999"])
    assert str(error.value) == "serve: --port must be in 0-65535, got 99999"


def test_serve_port_in_use_is_one_line(tmp_path):
    """Checked before the model loads (before: uvicorn's INFO lines and 'ERROR: [Errno 98] ...' once it had loaded)."""
    import socket

    from mateconv.serve.cli import main as serve_main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as error:
            serve_main(["--model_path", str(tmp_path), "--port", str(port)])
    assert str(error.value) == f"serve: cannot listen on 127.0.0.1:{port}: Address already in use"


def test_bad_input_is_one_line(tiny_sft_model, tmp_path):
    with pytest.raises(SystemExit) as error:
        main(["--model_path", str(tmp_path), "--prompt", "hi"])
    assert str(error.value) == (f"chat: no model at {tmp_path} (expected a save_pretrained directory with config.json, "
                                "or a training checkpoint: checkpoints/step_N)")
    with pytest.raises(SystemExit) as error:
        main(["--model_path", str(tiny_sft_model), "--prompt", "hi", "--top_p", "2"])
    assert str(error.value) == "chat: top_p must be in (0, 1], got 2.0"
    with pytest.raises(SystemExit) as error:  # seed 000's --device on a machine without that GPU (a traceback before)
        main(["--model_path", str(tiny_sft_model), "--prompt", "hi", "--device", "cuda:99"])
    assert str(error.value) == (f"chat: device cuda:99 is not there: {torch.cuda.device_count()} CUDA GPU(s) visible; "
                                "--device auto takes what there is")


def test_missing_tokenizer_is_one_clear_line(tiny_sft_model, tmp_path):
    """A model directory without its tokenizer files (before: "cannot load model/tokenizer from DIR: Couldn't
    instantiate the backend tokenizer from one of: ", the first line of transformers' advice to install sentencepiece)."""
    for file in tiny_sft_model.iterdir():
        if file.is_file() and not file.name.startswith("tokenizer"):
            (tmp_path / file.name).write_bytes(file.read_bytes())
    with pytest.raises(SystemExit) as error:
        main(["--model_path", str(tmp_path), "--prompt", "hi"])
    assert str(error.value) == (f"chat: no tokenizer in {tmp_path} (tokenizer.json, tokenizer_config.json, ...): copy "
                                "there the tokenizer the model was trained with, e.g. the files of out/tokenizer")


@pytest.fixture(scope="module")
def dense(tiny_sft_model):
    return load_model(tiny_sft_model, device="cpu")


def test_stream_pieces_and_history(dense, expected):
    model, tokenizer = dense
    options = SamplingOptions(max_new_tokens=24, temperature=0.0)
    pieces = list(stream_reply(model, tokenizer, [{"role": "user", "content": QUESTION}], options))
    assert len(pieces) >= 2 and "".join(pieces) == expected

    out = io.StringIO()
    session = ChatSession(model, tokenizer, options)
    assert session.reply(QUESTION, out) == expected
    assert out.getvalue() == expected
    session = ChatSession(model, tokenizer, options, system="You are tiny.")
    session.reply(QUESTION, out)
    session.reply(QUESTION, out)
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
    session.reset()
    assert session.messages == [{"role": "system", "content": "You are tiny."}]


def test_seeded_sampling_is_reproducible(dense):
    model, tokenizer = dense
    messages = [{"role": "user", "content": QUESTION}]
    runs = ["".join(stream_reply(model, tokenizer, messages, SamplingOptions(16, 1.5, 1.0, 0, 1.0, seed)))
            for seed in (3, 3)]
    assert runs[0] == runs[1]


def test_history_is_trimmed_to_fit(tiny_tokenizer):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer)
    messages = [{"role": "system", "content": "sys"}]
    for i in range(20):
        messages += [{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": "answer"}]
    messages.append({"role": "user", "content": "last"})
    kept = fit_history(tokenizer, messages, budget=60)
    assert kept[0]["role"] == "system" and kept[-1] == {"role": "user", "content": "last"}
    assert len(tokenizer.apply_chat_template(kept, add_generation_prompt=True, tokenize=True, return_dict=False)) <= 60
    assert kept[1]["role"] == "user"  # whole turns are dropped, never half of one
    assert len(kept) < len(messages)


def test_bad_options():
    with pytest.raises(ChatError, match="top_p"):
        SamplingOptions(top_p=0.0)
    with pytest.raises(ChatError, match="temperature"):
        SamplingOptions(temperature=-1)


def test_interactive_loop_reports_errors_and_goes_on(dense, expected):
    model, tokenizer = dense
    session = ChatSession(model, tokenizer, SamplingOptions(max_new_tokens=24, temperature=0.0))
    out = io.StringIO()
    run_interactive(session, io.StringIO("word " * 200 + f"\n{QUESTION}\n"), out)
    text = out.getvalue()
    assert "(error: the prompt is" in text and text.split(">>> ")[2].startswith(expected)
    assert [m["role"] for m in session.messages] == ["user", "assistant"]  # the failed turn left no trace


def test_text_completion_continues_a_pretrained_models_text(tiny_pretrain_model, capsys):
    """`--text_completion` (eval_model.py --model_mode 0): the pretrained model continues the text as a document
    start (after the end-of-document token it learned), no chat template; the same greedy tokens as generate_tokens
    on those ids."""
    from model.generation import generate_tokens

    model, tokenizer = load_model(tiny_pretrain_model, device="cpu")
    text = "The answer is"
    ids = [tokenizer.eos_token_id] + tokenizer.encode(text, add_special_tokens=False)
    with torch.no_grad():
        new = generate_tokens(model, torch.tensor([ids]), 12, temperature=0,
                              eos_token_id=tokenizer.eos_token_id)[0, len(ids):].tolist()
    new = new[:new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new
    assert new, "the model ended the text at once: nothing compared"
    main(["--model_path", str(tiny_pretrain_model), "--text_completion", "--prompt", text, "--temperature", "0",
          "--max_new_tokens", "12", "--device", "cpu"])
    assert capsys.readouterr().out == tokenizer.decode(new) + "\n"


def test_input_that_is_not_utf8_is_one_line(tiny_untrained_model, capsys):
    # GBK bytes from a terminal or a pipe reach Python as lone surrogates ("你好" in GBK: c4 e3 ba c3)
    gbk = "你好".encode("gbk").decode("utf-8", "surrogateescape")
    model, tokenizer = load_model(tiny_untrained_model, device="cpu")
    session = ChatSession(model, tokenizer, SamplingOptions(max_new_tokens=2, temperature=0.0))
    out = io.StringIO()
    run_interactive(session, io.StringIO(f"{gbk}\n你好\n"), out)
    replies = out.getvalue().split(">>> ")
    assert replies[1].startswith("(error: the message is not UTF-8 text") and "iconv -f GBK" in replies[1]
    assert [m["role"] for m in session.messages] == ["user", "assistant"]  # the next line was answered
    with pytest.raises(SystemExit, match="^chat: the system prompt is not UTF-8 text"):
        main(["--model_path", str(tiny_untrained_model), "--device", "cpu", "--prompt", "hi", "--system", gbk])


@pytest.mark.parametrize("flags, line", [
    (["--use_moe", "1"], "has dim 64, n_layers 2, use_moe false, not use_moe true"),
    (["--use_moe", "--dim", "64"], "has dim 64, n_layers 2, use_moe false, not dim 64, use_moe true"),
    (["--use_moe", "maybe"], None),  # argparse's own error: expected 1 or 0
])
def test_eval_model_checks_minimind_use_moe(flags, line, tmp_path, capsys):
    """MiniMind's `eval_model.py --use_moe 1` picked its MoE checkpoint; it went on to the chat's parser, which
    refused it as an unknown argument. It is checked against the model's kind, as --dim and --n_layers are."""
    final = tmp_path / "sft" / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text('{"dim": 64, "n_layers": 2, "use_moe": false}')
    with pytest.raises(SystemExit) as stopped:
        seed_main(["--out_dir", str(tmp_path), "--model_mode", "1", *flags])
    if line is None:
        assert stopped.value.code == 2 and "--use_moe: expected 1 or 0, got 'maybe'" in capsys.readouterr().err
    else:
        assert str(stopped.value.code) == f"eval_model: {final} {line}"
