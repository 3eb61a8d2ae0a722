"""Stage 7: preference pairs from an OpenAI-compatible generator and judge.

endpoints.py: where the endpoints are, calling them (concurrency, retries), cost; judge.py: rubric, JSON validation,
rule judge, pair choice; store.py: prompt sampling and the resumable result files; pipeline.py: the run; cli.py: flags.
"""
from mateconv.prefs.endpoints import PrefsError
from mateconv.prefs.pipeline import PrefsConfig, run

__all__ = ["PrefsConfig", "PrefsError", "run"]
