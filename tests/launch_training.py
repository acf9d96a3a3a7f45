"""Run a recipe under ``accelerate launch`` for tests/test_training.py, recording what each process saw.

    accelerate launch --num_processes 2 tests/launch_training.py <out> zoo-train arguments...

Each process writes ``<out>/rank<r>.json`` (the dataset indices it loaded, per epoch) and
``<out>/rank<r>.safetensors`` (its final weights).
"""

import json
import sys
from pathlib import Path

from accelerate import PartialState
from safetensors.torch import save_file

from zoo.training import train


def main() -> None:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    seen: dict[int, list[int]] = {}
    load = train.SeededAugmentation.__getitem__

    def recording(self, index):
        seen.setdefault(self.epoch, []).append(int(index))
        return load(self, index)

    train.SeededAugmentation.__getitem__ = recording
    prepared = []
    prepare = train.Accelerator.prepare

    def keep(self, *objects, **kwargs):
        prepared.append(prepare(self, *objects, **kwargs))
        return prepared[-1]

    train.Accelerator.prepare = keep
    train.main(argv)
    rank = PartialState().process_index  # only after the Accelerator has set up the processes
    (out / f"rank{rank}.json").write_text(json.dumps(seen))
    model = getattr(prepared[0][0], "module", prepared[0][0])  # DistributedDataParallel holds the model
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / f"rank{rank}.safetensors")


if __name__ == "__main__":
    main()
