"""A run's state in its checkpoints, and a run resumed from one: everything a Trainer must put back for a resumed
run to end with the same weights as one that never stopped (the trained parameters, the optimizer, the learning
rate schedule, EMA, the data cursors and every random generator).

The files themselves (atomic folders, the manifest, which checkpoints are complete) are gen.train.checkpoint's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from gen.train import checkpoint
from gen.train.common import TrainError

logger = logging.getLogger("gen.train")


def trainable_state(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Copies of the parameters that train, named "<module>.<parameter>" (frozen ones are the loaded model's)."""
    return {
        f"{m}.{n}": p.detach().clone()
        for m, mod in modules.items()
        for n, p in mod.named_parameters()
        if p.requires_grad
    }


# `trainer` below is a gen.train.trainer.Trainer, not imported here: the trainer imports this module.
def state_of(trainer) -> dict:
    """What a checkpoint holds: tensors, numbers and lists only (torch.load's weights_only reads it back)."""
    return {
        "trainable": trainable_state(trainer.trained_modules()),
        "optimizer": trainer.opt.state_dict(),
        "lr": trainer.lr.state_dict(),
        "ema": trainer.ema.state_dict() if trainer.ema else None,
        "step": trainer.step,
        "cursors": {k: list(v) for k, v in trainer.cursors.items()},
        "rng": list(trainer.rng.getstate()),
        "noise": trainer.noise.get_state(),
        "torch": torch.get_rng_state(),
    }


@torch.no_grad()
def restore(trainer, path: Path) -> None:
    """The trainer as it was when the checkpoint at `path` was written."""
    s = checkpoint.load(path)
    mine = {
        f"{m}.{n}": p
        for m, mod in trainer.trained_modules().items()
        for n, p in mod.named_parameters()
        if p.requires_grad
    }
    theirs = s["trainable"]
    # The same tensors may still sit in other optimizer groups (e.g. an identifier with its own rate, or without).
    same_groups = len(s["optimizer"]["param_groups"]) == len(trainer.opt.param_groups)
    if not same_groups or set(mine) != set(theirs) or any(mine[k].shape != theirs[k].shape for k in mine):
        raise TrainError(
            f"{path} was written by a run that trained other parameters ({len(theirs)} tensors in"
            f" {len(s['optimizer']['param_groups'])} optimizer groups against this run's {len(mine)} in"
            f" {len(trainer.opt.param_groups)}): resume with that run's options (its train_config.json), or start afresh"
        )
    for k, p in mine.items():
        p.copy_(theirs[k])
    trainer.opt.load_state_dict(s["optimizer"])
    trainer.lr.load_state_dict(s["lr"])
    if trainer.ema and s["ema"]:
        trainer.ema.load_state_dict(s["ema"])
    trainer.step, trainer.cursors = s["step"], {k: tuple(v) for k, v in s["cursors"].items()}
    r = s["rng"]  # random.getstate()'s tuple, stored as lists
    trainer.rng.setstate((r[0], tuple(r[1]), r[2]))
    trainer.noise.set_state(s["noise"])
    torch.set_rng_state(s["torch"])
    logger.info("resumed from %s at step %d", path, trainer.step)


def save(trainer) -> Path:
    """The checkpoint of this step (the main process writes it), keeping the newest --checkpoints-total-limit."""
    o = trainer.o
    return checkpoint.save(trainer.out, trainer.step, state_of(trainer), o.checkpoints_total_limit or None)


def resume(trainer) -> None:
    """Start where --resume says: the temporaries of a killed run removed, the named checkpoint put back."""
    if trainer.acc.is_main_process:
        checkpoint.clean_stale(trainer.out)
    path = checkpoint.resolve(trainer.out, trainer.o.resume)
    if path:
        restore(trainer, path)
