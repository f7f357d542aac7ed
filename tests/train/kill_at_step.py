"""``python tests/train/kill_at_step.py K <command> key=value...``: ``fastalign <command>`` SIGKILLed right after
optimizer step K (1-based) is done, as a crash would stop it. The resume tests kill real runs at a known point."""

import os
import signal
import sys

from fastalign.cli import main
from fastalign.train.common import Run

if __name__ == "__main__":
    kill_at = int(sys.argv[1])
    advance = Run.advance

    def advance_then_die(self, step: int) -> None:
        advance(self, step)
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    Run.advance = advance_then_die
    raise SystemExit(main(sys.argv[2:]))
