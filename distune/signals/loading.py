"""Loading a teacher's weights: whole on one device, spread over this machine's GPUs, or as the blueprint a
partitioned build reads slice by slice. Imports neither ray nor deepspeed."""

from __future__ import annotations

from distune.models import load_model, partitioned_blueprint
from distune.signals.base import Prepared


def load_teacher(prep: Prepared):
    return load_model(prep.source, prep.spec.dtype, prep.spec.trust_remote_code)


def place_teacher(prep: Prepared, device):
    """(the teacher whole, in eval mode, the device its inputs go to): on `device`, or spread over every visible
    GPU when there are several (a teacher bigger than one GPU: a layer range on each, inputs enter on the first)."""
    import torch

    if torch.cuda.device_count() > 1:
        model = load_model(prep.source, prep.spec.dtype, prep.spec.trust_remote_code, device_map="auto").eval()
        return model, model.get_input_embeddings().weight.device
    return load_teacher(prep).to(device).eval(), device


def teacher_blueprint(prep: Prepared):
    """(blueprint, None) or (None, why the teacher cannot be loaded partitioned)."""
    spec = prep.spec
    return partitioned_blueprint(prep.source, False, dtype=spec.dtype, trust_remote_code=spec.trust_remote_code,
                                 key="method.teacher.path")
