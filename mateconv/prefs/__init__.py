"""Stage 7: preference pairs from an OpenAI-compatible generator and judge.

endpoints.py: where the endpoints are, calling them (concurrency, retries), cost; judge.py: rubric, JSON validation,
rule judge, pair choice; store.py: prompt sampling and the resumable result files; pipeline.py: the run; cli.py: flags.
"""
from mateconv.prefs.endpoints import PrefsError

__all__ = ["PrefsConfig", "PrefsError", "run"]


def __getattr__(name: str):
    # The run needs the model server (torch); importing it lazily keeps `mateconv.prefs.endpoints` light for the
    # pipeline, which only asks whether a judge endpoint is configured.
    if name in ("PrefsConfig", "run"):
        from mateconv.prefs import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'mateconv.prefs' has no attribute {name!r}")
