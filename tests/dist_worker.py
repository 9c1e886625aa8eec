"""Run under torchrun by test_distributed.py: a few training steps with DDP or FSDP2, params saved by rank 0."""

import os
import sys
from pathlib import Path

import torch
from test_train import ListSource, config, flat_params, lm_data, tiny_model

from lmforge.train.distributed import init_distributed, unwrap, wrap
from lmforge.train.loop import Trainer
from lmforge.train.losses import causal_lm_loss


def main() -> None:
    strategy, out, steps = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    env = init_distributed()
    model = wrap(tiny_model(), strategy, env)
    cfg = config(steps=steps, micro_batch_size=4, lr=1e-3, strategy=strategy, save_every=2)
    trainer = Trainer(model, cfg, ListSource(lm_data(), 8), causal_lm_loss, out, env=env)
    trainer.run(resume="--resume" in sys.argv)
    from lmforge.train.distributed import full_state

    state, _ = full_state(model, None, env)
    if env.is_main:
        reference = unwrap(tiny_model())
        reference.load_state_dict(state)
        torch.save(flat_params(reference), out / "params.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    # Leave without C++ static destructors: now and then a gloo thread still joinable at interpreter
    # teardown aborts the process ("terminate called without an active exception") after all the work
    # above has finished and been saved.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
