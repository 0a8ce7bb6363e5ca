"""Pipelines in: folders, single files and the embedded model (pipeline.py), ControlNets (controlnet.py), the
precisions they load in (precision.py), a folder's description (info.py). The checks every load goes through and
the single-file layout are the pipelines' own (gen.pipelines.safety, gen.pipelines.single_file): a pipeline's
from_pretrained and from_single_file apply them too."""
