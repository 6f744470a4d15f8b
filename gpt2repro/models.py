"""Every model the trainer builds, by the `model_type` that flags and checkpoints name, with its config class."""

from __future__ import annotations

from lecture import LectureConfig, LectureLanguageModel
from model import GPT, BigramLanguageModel, GPTConfig, LanguageModel

MODEL_TYPES: dict[str, type[LanguageModel]] = {"gpt": GPT, "bigram": BigramLanguageModel,
                                               "lecture": LectureLanguageModel}
ModelConfig = GPTConfig | LectureConfig
MODEL_CONFIGS: dict[str, type[ModelConfig]] = {"gpt": GPTConfig, "bigram": GPTConfig, "lecture": LectureConfig}
