"""The CLI's generation loop: batches, progress, PNG metadata, several processes, Ctrl-C, and `gen reproduce`."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from gen import generation as G
from gen.cli import outputs
from gen.generation import metadata
from gen.generation.clip_skip import check_recorded
from gen.generation.inputs import ControlPictures, InitImages, read_control_pictures, read_init_images
from gen.loading.assets import model_folder
from gen.pixels import contact_sheet


def _distributed():
    """accelerate's process state when launched with several processes (accelerate launch), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    # Without cpu=True, accelerate sees no CUDA and treats the processes as independent single runs.
    return PartialState(cpu=not torch.cuda.is_available())


class Runner:
    def __init__(self, o: G.Options, args, name, total: int, announce_seed: bool = False):
        self.o, self.args, self.name, self.total = o, args, name, total
        self.announce_seed = announce_seed and not args.quiet
        self.state = _distributed()
        self.saved = 0  # a count, not a list: a run may write millions of images
        # Read and checked before a model loads: a bad file fails in a moment.
        self.init = read_init_images(o.init_image, o.mask, o.mask_blur, o.invert_mask)
        self.control = read_control_pictures(o.control)

    def _record(self, pipe, job: G.Job, image) -> dict:
        return metadata.record(pipe, self.o, job, image, self.model_hash, self.init, self.control)

    def run(self, jobs) -> int:
        o, quiet = self.o, self.args.quiet
        why = G.resolve_precision(o)  # "auto" decided here, once: load keeps it, the PNGs record it
        pipe = G.load(o)
        G.validate(pipe, o, self.init)  # on the loaded model, as the server checks: before the task is made
        pipe = G.task_pipeline(pipe, self.init)
        if self.announce_seed:
            print(f"gen: seed: {o.seed}", file=sys.stderr)
        if why and not quiet:  # after the checks, as the seed: a refused run's error stays one line
            print(f"gen: precision: {o.dtype} ({why})", file=sys.stderr)
        self.model_hash = metadata.model_hash(model_folder(o.model or None))
        if self.state is not None:  # every process takes every num_processes-th image; seeds stay per image
            jobs = (j for j in jobs if j.index % self.state.num_processes == self.state.process_index)
            self.state.wait_for_everyone()
        mine = (
            self.total
            if self.state is None
            else len(range(self.state.process_index, self.total, self.state.num_processes))
        )
        bar = tqdm(
            total=mine * G.steps_run(o),
            unit="step",
            disable=True if quiet else None,
            file=sys.stderr,
            leave=False,
        )
        start, images = time.monotonic(), []
        try:
            for batch in G.batches(jobs, o.batch_size):
                step = len(batch)
                for job, image in zip(
                    batch,
                    G.render(
                        pipe,
                        o,
                        batch,
                        on_step=lambda n=step: bar.update(n),
                        init=self.init,
                        control=self.control,
                    ),
                    strict=True,
                ):
                    info = metadata.png_info(self._record(pipe, job, image))
                    path = outputs.save(
                        image,
                        self.name,
                        k=job.index,
                        total=self.total,
                        overwrite=self.args.overwrite,
                        pnginfo=info,
                    )
                    self.saved += 1
                    if self.args.grid:  # only then: a million-line prompt file must not pile up images
                        images.append(image)
                    print(path, flush=True)
        except KeyboardInterrupt:
            bar.close()
            print(f"gen: interrupted; kept {self.saved} finished image(s)", file=sys.stderr)
            return 130
        bar.close()
        elapsed = time.monotonic() - start
        if self.args.grid and images:
            outputs.save(contact_sheet(images), lambda n: Path(self.args.grid), k=0, total=1, overwrite=True)
            print(self.args.grid, flush=True)
        if not quiet:
            n = self.saved
            print(
                f"gen: {n} image(s) in {elapsed:.1f} s ({elapsed / max(n, 1):.2f} s/image)", file=sys.stderr
            )
        return 0


def _given_inputs(record: dict, o: G.Options, args) -> InitImages | None:
    """The init image and mask for `gen reproduce`: the ones given again (--init-image, --mask), else the
    recorded paths; refused when their pixels are not the ones the PNG was made from."""
    if "init_image_hash" not in record:
        return None
    o.init_image = str(args.init_image) if args.init_image else o.init_image
    o.mask = str(args.mask) if args.mask else o.mask
    init = read_init_images(o.init_image, o.mask, o.mask_blur, o.invert_mask)
    for name, path, key in (("init image", o.init_image, "init_image_hash"), ("mask", o.mask, "mask_hash")):
        want, got = record.get(key), init.hashes().get(key)
        if want != got:
            raise ValueError(
                f"{name} {path} is not the one {args.image} was made from (pixel hash {str(got)[:12]}, recorded"
                f" {str(want)[:12]}); give the original with --{'init-image' if key == 'init_image_hash' else 'mask'}"
            )
    return init


def _given_control(record: dict, o: G.Options, args) -> ControlPictures | None:
    """The ControlNet units' pictures for `gen reproduce`: those given again (--control-image, in unit order),
    else the recorded paths; refused when their pixels are not the ones the PNG was made from."""
    for k, path in enumerate(args.control_image or []):
        if k >= len(o.control):
            raise ValueError(f"--control-image {path}: {args.image} has {len(o.control)} ControlNet unit(s)")
        o.control[k]["image"] = str(path)
    control = read_control_pictures(o.control)
    for k, (want, got) in enumerate(
        zip(record.get("control_image_hashes", []), control.hashes if control else [], strict=False)
    ):
        if want != got:
            raise ValueError(
                f"control image {o.control[k]['image']} (unit {k}) is not the one {args.image} was made from"
                f" (pixel hash {got[:12]}, recorded {want[:12]}); give the original with --control-image"
            )
    return control


def reproduce(args) -> int:
    """Re-run the generation recorded in a PNG; report the largest pixel difference."""
    from PIL import Image

    record = metadata.read(args.image)
    o = G.Options.from_dict(record["options"])
    o.prompt, o.seed, o.num_images, o.batch_size = record["prompt"], record["seed"], 1, 1
    if args.model is not None:
        o.model = args.model
    if args.base is not None:
        o.base = args.base
    if args.text_encoder is not None:
        o.text_encoder = args.text_encoder
    if args.vae is not None:
        o.vae = args.vae
    G.check_options(o)
    init = _given_inputs(record, o, args)
    control = _given_control(record, o, args)
    pipe = G.task_pipeline(G.load(o), init)
    try:
        check_recorded(pipe, o.clip_skip, record["read_from_format"])
    except ValueError as e:
        raise ValueError(f"{args.image}: {e}") from None
    G.validate(pipe, o, init)
    image = G.render(pipe, o, [G.Job(0, o.prompt, o.seed)], init=init, control=control)[0]
    if args.output:
        out = outputs.save(
            image,
            outputs.namer(args.output, 1),
            k=0,
            total=1,
            overwrite=False,
            pnginfo=metadata.png_info({**record, "reproduced_from": str(args.image)}),
        )
        print(out)
    with Image.open(args.image) as original:
        a = np.asarray(original.convert("RGB"), dtype=np.int16)
    b = np.asarray(image.convert("RGB"), dtype=np.int16)
    if a.shape != b.shape:
        print(f"gen: sizes differ: {a.shape[1]}x{a.shape[0]} vs {b.shape[1]}x{b.shape[0]}", file=sys.stderr)
        return 1
    diff = int(np.abs(a - b).max())
    print(f"max pixel difference: {diff} (tolerance {args.tolerance})")
    return 1 if args.verify and diff > args.tolerance else 0
