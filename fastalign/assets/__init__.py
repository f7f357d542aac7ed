"""The embedded default: a character-level tokenizer, a tiny Llama config and the two-digit addition task.

``model=embedded`` / ``data=embedded`` select these files; ``python -m fastalign.assets.build`` regenerates them.
"""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent
EMBEDDED = "embedded"  # the model/tokenizer/data name that selects fastalign/assets/
