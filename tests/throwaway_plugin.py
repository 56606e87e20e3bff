"""Install a throwaway third-party method the way pip would: a module plus a .dist-info folder that
declares it in the `distune.methods` entry-point group, in a folder put on the path."""

from __future__ import annotations

import textwrap
from pathlib import Path

SOURCE = textwrap.dedent('''
    """norm-tuning: train only the normalisation weights (a third-party distune method)."""
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    from distune.methods import Method, MethodConfig


    class NormConfig(MethodConfig):
        scale_lr_note: str = "norms only"


    class NormTuning(Method):
        Config = NormConfig

        def adapt(self, model):
            for name, p in model.named_parameters():
                p.requires_grad_("norm" in name)
            return model

        def export_keys(self, model):
            return {n for n, p in model.named_parameters() if p.requires_grad}

        def export(self, model, state_dict, out_dir: Path):
            save_file({k: v.contiguous() for k, v in state_dict.items()}, str(out_dir / "norms.safetensors"))
''')


def install(site: Path) -> Path:
    return install_distribution(site, "throwaway_norm_method", SOURCE, "distune.methods", "norm_tuning", "NormTuning")


def install_distribution(site: Path, module: str, source: str, group: str, name: str, attr: str) -> Path:
    """`module` (its `source`) in `site`, with the .dist-info that declares `name = module:attr` in entry-point
    `group`: what `pip install` of a one-module package leaves behind."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(source)
    info = site / f"{module}-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n{name} = {module}:{attr}\n")
    (info / "RECORD").write_text("")
    return site
