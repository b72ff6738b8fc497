"""Task models that take an (adapted) backbone."""

from medadapt.models.box_prompt import BoxPromptSegmenter, boxes_from_masks
from medadapt.models.classifier import Classifier
from medadapt.models.factory import create_model
from medadapt.models.loading import load_model
from medadapt.models.segmenter import Segmenter
from medadapt.models.stem import ChannelMapping
from medadapt.models.volume import VolumeSegmenter

__all__ = ["BoxPromptSegmenter", "ChannelMapping", "Classifier", "Segmenter", "VolumeSegmenter",
           "boxes_from_masks", "create_model", "load_model"]
