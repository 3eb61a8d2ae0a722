"""Command line of stage 7 (`7.gen_prefs_openai.py`); every flag maps onto a PrefsConfig field of the same name."""
from __future__ import annotations

import argparse

from mateconv.flags import ArgumentParser
from mateconv.prefs.pipeline import JUDGE_MODES, PrefsConfig, run
from mateconv.prefs.endpoints import PrefsError
from mateconv.terminal import bars_only_on_a_terminal, exit_interrupted, signals_interrupt

DEFAULTS = PrefsConfig()


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description="Stage 7: preference pairs from an OpenAI-compatible generator and judge (docs/prefs.md).")
    data = parser.add_argument_group("data")
    data.add_argument("--prompts_path", default=DEFAULTS.prompts_path,
                      help="JSONL of tasks ({id,messages,answer}), SFT conversations ({id,messages}) or {id,prompt}")
    data.add_argument("--n_prompts", type=int, default=DEFAULTS.n_prompts,
                      help="prompts sampled with --seed; a larger sample contains the smaller one, so raising it and "
                           "running again only adds prompts")
    data.add_argument("--seed", type=int, default=DEFAULTS.seed,
                      help="prompt sample, request seeds, judge orders")
    data.add_argument("--output_dir", default=DEFAULTS.output_dir)
    data.add_argument("--skip_failed", action="store_true", help="do not retry prompts in failures.jsonl")

    generator = parser.add_argument_group("generator")
    generator.add_argument("--generator_base_url", help="URL, 'openai' or 'local' (default: $OPENAI_BASE_URL, else "
                           "OpenAI when --generator_model is given, else the local server)")
    generator.add_argument("--generator_model", help="default: 'mateconv' (local server) or gpt-4o")
    generator.add_argument("--generator_model_path", default=DEFAULTS.generator_model_path,
                           help="model the local server serves")
    generator.add_argument("--k_samples", type=int, default=DEFAULTS.k_samples, help="replies per prompt")
    generator.add_argument("--temperature", type=float, default=DEFAULTS.temperature)
    generator.add_argument("--top_p", type=float, default=DEFAULTS.top_p)
    generator.add_argument("--max_tokens", type=int, help="per reply (default: the server's)")

    judge = parser.add_argument_group("judge")
    judge.add_argument("--judge", choices=JUDGE_MODES, default=DEFAULTS.judge,
                       help="rule: the record's known answer; model: the judge model; both (the rule first, the model "
                            "between equally right or wrong replies); auto (default): rule for verifiable prompts, "
                            "plus the model when a judge endpoint is configured, model otherwise")
    judge.add_argument("--judge_base_url", help="URL, 'openai' or 'generator' (default: $OPENAI_BASE_URL, else OpenAI "
                       "when --judge_model or a key is given, else none)")
    judge.add_argument("--judge_model", help="default: gpt-4o-mini, or the generator's model with 'generator'")
    judge.add_argument("--judge_temperature", type=float, default=DEFAULTS.judge_temperature)
    judge.add_argument("--judge_max_tokens", type=int, help="default: the server's")
    judge.add_argument("--judge_retries", type=int, default=DEFAULTS.judge_retries,
                       help="new answers asked for after a malformed one")
    judge.add_argument("--no_json_mode", dest="judge_json_mode", action="store_false",
                       help="do not send response_format=json_object to the judge")
    judge.add_argument("--min_margin", type=float, default=DEFAULTS.min_margin,
                       help="best minus worst score below this: no pair (with both, where the rule scores all "
                            "replies alike, the model judge decides and its own best minus worst, 1-10, is measured)")

    requests = parser.add_argument_group("requests")
    requests.add_argument("--max_concurrency", type=int, default=DEFAULTS.max_concurrency, help="requests in flight")
    requests.add_argument("--max_retries", type=int, default=DEFAULTS.max_retries,
                          help="per request, on timeouts, dropped connections, 408/409/429, 5xx")
    requests.add_argument("--request_timeout", type=float, default=DEFAULTS.request_timeout, help="seconds")
    requests.add_argument("--backoff_base", type=float, default=DEFAULTS.backoff_base,
                          help="seconds, doubled per retry")
    requests.add_argument("--backoff_max", type=float, default=DEFAULTS.backoff_max,
                          help="seconds, also caps Retry-After")
    requests.add_argument("--health_timeout", type=float, default=DEFAULTS.health_timeout, help="seconds")

    report = parser.add_argument_group("report")
    report.add_argument("--price", dest="prices", action="append", default=[], metavar="MODEL=IN,OUT",
                        help="USD per million input,output tokens (repeatable)")
    report.add_argument("--no_progress", dest="progress", action="store_false", help="no tqdm bar")
    return parser


def main(argv: list[str] | None = None) -> dict:
    config = PrefsConfig(**vars(build_parser().parse_args(argv)))
    bars_only_on_a_terminal()
    try:
        # kill -2 and kill unwind like Ctrl-C, so the local server is stopped and the files closed
        with signals_interrupt():
            return run(config)
    except PrefsError as error:
        raise SystemExit(f"prefs: {error}") from None
    except KeyboardInterrupt:
        exit_interrupted("prefs: interrupted; finished prompts are saved, run again to resume")
