"""`pipetrain train` with one injected failure, for the elastic-restart test: on the first attempt
(TORCHELASTIC_RESTART_COUNT=0), rank FAIL_RANK SIGKILLs itself as optimizer step FAIL_AT_STEP begins."""

import os
import signal
import sys

from pipetrain.cli import main
from pipetrain.train import trainer

if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" and os.environ["RANK"] == os.environ["FAIL_RANK"]:
    fail_at = int(os.environ["FAIL_AT_STEP"])
    original = trainer.Trainer.train_step

    def train_step(self, **kwargs):
        if self.step + 1 == fail_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, **kwargs)

    trainer.Trainer.train_step = train_step

sys.exit(main(["train", *sys.argv[1:]]))
