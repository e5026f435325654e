"""decoderlab inside EleutherAI's lm-evaluation-harness (`pip install 'decoderlab[eval]'`).

`model`: `DecoderlabLM`, registered with the harness as `decoderlab` when this package is imported (lm-eval 0.4.13
has no plugin entry points, so `lm_eval --model decoderlab` cannot find it on its own):
`import decoderlab.harness; lm_eval.simple_evaluate(model="decoderlab", model_args="pretrained=FOLDER", ...)`, or
`python -m decoderlab.harness run --model decoderlab --model_args pretrained=FOLDER --tasks ...` (the harness's
own command line with the model registered).
`run`: `evaluate(model, tasks)`, which also takes local task YAML files and folders (what `decoderlab eval` runs).
"""

from .model import DecoderlabLM
from .run import evaluate, resolve_tasks, results_table

__all__ = ["DecoderlabLM", "evaluate", "resolve_tasks", "results_table"]
