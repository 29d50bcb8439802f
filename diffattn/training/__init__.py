"""LoRA fine-tuning with sparse attention (``diffattn train-lora``): the training loop
(:mod:`.lora`), data (:mod:`.data`), per-family rules (:mod:`.families`), checkpoints
(:mod:`.checkpoint`), objectives (:mod:`.objectives`) and length extrapolation (:mod:`.length`)."""

from .lora import TrainLoraOptions, TrainResult, train_lora

__all__ = ["TrainLoraOptions", "TrainResult", "train_lora"]
