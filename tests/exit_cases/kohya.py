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


def _step_not_saved(c: Case) -> list:
    """The caller, a reviewer, approves step 7 of a run that saved no adapter mid-run."""
    import getpass

    c.policies(f"reviewers_group: no-such-group-xyz\nmembers: [{getpass.getuser()}]\n")
    c.make_run("r1", user="alice")
    return ["review", "approve", "r1", "--step", "7", "--note", "epoch 2 looks best"]


def _resize_not_kohya(c: Case) -> list:
    import torch
    from safetensors.torch import save_file

    path = c.tmp / "peft.safetensors"
    save_file({"unet.to_q.lora_A.weight": torch.zeros(2, 4)}, str(path))
    return ["resize", path, "--rank", "1"]


def _convert_not_lora(c: Case) -> list:
    import torch
    from safetensors.torch import save_file

    path = c.tmp / "model.safetensors"
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(2, 4)}, str(path))
    return ["convert", path, "--to", "diffusers"]


def _prior_without_reg(c: Case) -> list:
    return ["config", c.config(prior_loss_weight=0.5)]


def _reg_is_training_folder(c: Case) -> list:
    return ["config", c.config(reg_data_dir=str((c.demo / "datasets" / "image").resolve()))]


def _validation_dir_is_training_folder(c: Case) -> list:
    return ["config", c.config(validation_dir=str((c.demo / "datasets" / "image").resolve()))]


def _conv_dim_on_lora(c: Case) -> list:
    return ["config", c.config(conv_dim=4)]


def _ddpm_option_for_flux(c: Case) -> list:
    from exit_cases.flow import _flux_config
    return ["config", _flux_config(c, min_snr_gamma=5.0)]


CASES: dict[str, Callable[[Case], list]] = {
    "kohya TOML names a Hugging Face model id (`lora config --from-kohya`)": _hub_id_toml,
    "`optimizer` needs a package this platform does not ship (D-Adaptation, CAME)":
        _unshipped_optimizer,
    "config sets a key in both kohya's spelling and ours (`network_dim` and `lora_rank`)":
        _both_spellings,
    "`lora review approve RUN --step N` names a step the run saved no adapter at": _step_not_saved,
    "`lora resize` of a file that is not a kohya-format LoRA": _resize_not_kohya,
    "`lora convert` of a file that is not a LoRA in kohya or diffusers format": _convert_not_lora,
    "`prior_loss_weight` without `reg_data_dir`": _prior_without_reg,
    "`reg_data_dir` is the training folder, or a folder inside it": _reg_is_training_folder,
    "`validation_dir` is the training folder, or a folder inside it":
        _validation_dir_is_training_folder,
    "`conv_dim`, `conv_alpha`, `lokr_factor` or `use_dora` that does not fit `network_type` "
    "(e.g. `conv_dim` with plain `lora`)": _conv_dim_on_lora,
    "a DDPM loss option (`min_snr_gamma`, `noise_offset`, `multires_noise_iterations`, ...) or "
    "a LyCORIS `network_type` for a flow-matching model (Flux, SD3.5)": _ddpm_option_for_flux,
}
