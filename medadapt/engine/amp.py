"""Mixed precision for every trainer, evaluator and inferer of a bundle: the ``amp`` setting.

``amp`` is False (float32), True (the device's usual half type: float16 on CUDA, bfloat16 on
the CPU), "fp16" or "bf16". MONAI's engines only know CUDA autocast with a gradient scaler,
which is right for float16 on a GPU and does nothing on a CPU; so float16 on CUDA goes
through MONAI's own ``amp`` (with its scaler), and everything else through
`AutocastInferer`, which runs the network under ``torch.autocast`` for the network's device
and hands the loss float32 outputs. bfloat16 has float32's range: it needs no loss scaling.
"""

from __future__ import annotations

import torch
from monai.inferers import Inferer

AMP_SETTINGS = (False, True, "fp16", "bf16")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def amp_dtype(amp, device) -> torch.dtype | None:
    """The autocast dtype of ``amp`` on ``device``, or None for float32."""
    if isinstance(amp, str) and amp.lower() in ("false", "true"):
        amp = amp.lower() == "true"
    if amp not in AMP_SETTINGS:
        raise ValueError(f"option 'amp' must be one of {list(AMP_SETTINGS)}, got {amp!r}")
    if amp is False:
        return None
    if amp is True:
        return torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16
    return _DTYPES[amp]


def monai_amp(amp, device) -> bool:
    """Whether MONAI's own ``amp`` (CUDA autocast with a gradient scaler) runs: float16 on CUDA."""
    return amp_dtype(amp, device) == torch.float16 and torch.device(device).type == "cuda"


def monai_amp_kwargs(amp, device) -> dict:
    return {"dtype": torch.float16} if monai_amp(amp, device) else {}


class AutocastInferer(Inferer):
    """Run ``inferer`` under ``torch.autocast`` as ``amp`` says (see the module docstring);
    outputs come back in float32. A no-op for float32 and for MONAI's own float16 on CUDA.

    Arguments:
      inferer: the inferer to run (SimpleInferer, SlidingWindowInferer, ...).
      amp: the bundle's ``amp`` setting.
      device: the device the network runs on.
    """

    def __init__(self, inferer: Inferer, amp=False, device="cpu"):
        super().__init__()
        self.inferer, self.device = inferer, torch.device(device)
        self.dtype = amp_dtype(amp, self.device)
        self.active = self.dtype is not None and not monai_amp(amp, self.device)

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs):
        if not self.active:
            return self.inferer(inputs, network, *args, **kwargs)
        with torch.autocast(self.device.type, dtype=self.dtype):
            outputs = self.inferer(inputs, network, *args, **kwargs)
        return outputs.float() if isinstance(outputs, torch.Tensor) else outputs
