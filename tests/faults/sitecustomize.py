"""Fault injection for the crash tests, kept out of lora-cli itself.

A test that must kill lora-cli at an exact point runs it with this folder first on
PYTHONPATH (Python imports ``sitecustomize`` at start-up, workers of a multi-worker run
too) and LORA_CLI_TEST_FAULT set to the point:

    ckpt-write:N    SIGKILL once trainer_state.pt of the step-N checkpoint is written,
                    before trainer_state.json: the checkpoint is half-written
    merge-write     SIGKILL once the first tensor of a merged output is written

It wraps the functions at those points before lora-cli binds them (lora_cli.lora.files
and lora_cli.lora.safetensors_io need nothing but the standard library and, for the
second, torch).
"""

import os
import re
import signal

FAULT = os.environ.get("LORA_CLI_TEST_FAULT", "")


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


if FAULT.startswith("ckpt-write:"):
    import lora_cli.lora.files as files

    step = FAULT.split(":", 1)[1]
    real_write_synced = files.write_synced

    def write_synced(path, writer):
        real_write_synced(path, writer)
        if os.path.basename(path) == "trainer_state.pt" and re.match(rf"\.step_{step}\.tmp-",
                                                                     os.path.basename(os.path.dirname(path))):
            _kill()

    files.write_synced = write_synced

elif FAULT == "merge-write":
    import lora_cli.lora.safetensors_io as io

    real_write = io.SafetensorsWriter.write

    def write(self, name, tensor):
        real_write(self, name, tensor)
        if self._next == 1:
            _kill()

    io.SafetensorsWriter.write = write
