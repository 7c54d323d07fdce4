"""Training on Ray Train: the per-worker loop (`loop`) and the TorchTrainer around it (`trainer`)."""
from raymoll.train.trainer import TrainResult, build_trainer, fit, summary

__all__ = ["TrainResult", "build_trainer", "fit", "summary"]
