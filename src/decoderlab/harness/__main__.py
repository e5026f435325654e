"""`python -m decoderlab.harness ...`: lm-eval's own command line with the `decoderlab` model registered.

lm-eval 0.4.13 finds models only in its registry (no plugin entry points), so `lm_eval --model decoderlab` cannot
see this package; this runs the same CLI after `import decoderlab.harness` has registered it:
`python -m decoderlab.harness run --model decoderlab --model_args pretrained=FOLDER --tasks TASK`.
"""

from lm_eval.__main__ import cli_evaluate

import decoderlab.harness  # noqa: F401  (registers the model)

if __name__ == "__main__":
    cli_evaluate()
