"""How the training rows' X is stored on the device (``data.dtype``): in the parameters' dtype, or as bfloat16."""

from __future__ import annotations

import torch

from neuron_torch.errors import ConfigError


def storage_dtype(name: str, param_dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The dtype to store X in for a ``data.dtype`` setting; labels and weights stay in the parameters' dtype.

    Parameters
    ----------
    name : {"model", "bfloat16"}
        ``"model"``: X in the parameters' dtype (no conversion). ``"bfloat16"``: X rounded to bfloat16 once, when
        placed on the device, halving the bytes each update reads; the kernel accumulates in float32.
    param_dtype : torch.dtype
        The parameters' dtype; bfloat16 X needs float32.
    device : torch.device or str
        Where X is placed; bfloat16 X needs CUDA (no CPU kernel reads it: there it would cost a conversion per
        update instead of saving a read).

    Returns
    -------
    torch.dtype

    Raises
    ------
    ConfigError
        For another name, or bfloat16 off CUDA or with other than float32 parameters; the message says which.
    """
    if name == "model":
        return param_dtype
    if name != "bfloat16":
        raise ConfigError(f"data.dtype must be 'model' or 'bfloat16', got {name!r}")
    if torch.device(device).type != "cuda":
        raise ConfigError(f"data.dtype 'bfloat16' needs a CUDA device (the fused Triton kernel reads it); the data "
                          f"is placed on {torch.device(device).type}: use data.dtype 'model' there")
    if param_dtype != torch.float32:
        raise ConfigError(f"data.dtype 'bfloat16' accumulates in float32 and needs float32 parameters, got "
                          f"{str(param_dtype).removeprefix('torch.')} (trainer.precision 32-true)")
    return torch.bfloat16
