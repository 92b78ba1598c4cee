"""Pure-PyTorch models, objectives, heads and metrics (no Flower, no MLflow)."""

from .backbone import Backbone, TokenBackbone
from .registry import MODELS, TASKS
from .tasks import ClassificationConfig, ClassificationTask, StepOutput
from .vit import MultiModalViT, ViTConfig  # registers the "mmvit" backbone
from . import clip, dino, mae, segmentation  # noqa: F401,E402 - register the objectives
from . import foundation  # noqa: F401,E402 - registers "foundation" and "foundation_swin"

__all__ = ["MODELS", "TASKS", "Backbone", "TokenBackbone", "ClassificationConfig",
           "ClassificationTask", "StepOutput", "MultiModalViT", "ViTConfig"]
