"""Writes ``docs/dpo_loss_types.md`` from the table of loss types ``fastalign.losses.dpo.LOSSES``.

    python bench/gen_dpo_table.py            # (re)write the page
    python bench/gen_dpo_table.py --check    # exit 1 when the page differs from the table

``tests/losses/test_dpo.py`` checks that the committed page is up to date.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from fastalign.losses.dpo import DOC_PAGE, loss_types_markdown

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    page, text = ROOT / DOC_PAGE, loss_types_markdown()
    if args.check:
        if not page.exists() or page.read_text() != text:
            print(f"{DOC_PAGE} is out of date with fastalign.losses.dpo.LOSSES; run: python bench/gen_dpo_table.py")
            return 1
        print(f"{DOC_PAGE} is up to date")
        return 0
    page.write_text(text)
    print(f"wrote {DOC_PAGE} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
