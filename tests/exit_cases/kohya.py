"""kohya / lora-scripts habits (issue 24): converted configs, optimizers, kohya spellings."""
from __future__ import annotations

from collections.abc import Callable

from exit_cases import Case


def _hub_id_toml(c: Case) -> list:
    toml = c.tmp / "remote.toml"
    toml.write_text('pretrained_model_name_or_path = "runwayml/stable-diffusion-v1-5"\n'
                    'network_dim = 8\n')
    return ["config", "--from-kohya", toml, "-o", c.tmp / "out.yaml", "--kohya-root", c.tmp]


def _unshipped_optimizer(c: Case) -> list:
    return ["config", c.config(optimizer="DAdaptAdam")]


def _both_spellings(c: Case) -> list:
    return ["config", c.config(network_dim=4, lora_rank=8)]


CASES: dict[str, Callable[[Case], list]] = {
    "kohya TOML names a Hugging Face model id (`lora config --from-kohya`)": _hub_id_toml,
    "`optimizer` needs a package this platform does not ship (D-Adaptation, CAME)":
        _unshipped_optimizer,
    "config sets a key in both kohya's spelling and ours (`network_dim` and `lora_rank`)":
        _both_spellings,
}
