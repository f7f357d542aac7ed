"""``python -m bench [benchmark ...] [--device cpu|cuda] [--quick] [--out DIR]``: what ``fastalign bench`` runs."""

import sys

from bench._harness import main

sys.exit(main())
