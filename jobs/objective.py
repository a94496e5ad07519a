"""The pretraining objective of a training run (``objective:`` in the training configuration).

``forecast`` (ClimaX's, the default), ``masked`` (reconstruct masked input at lead time 0,
``climax/masking.py``), ``schedule`` (the first ``masked_steps`` optimiser steps masked, then
forecast) or ``mix`` (each step masked with probability ``mix``, drawn from (seed, step), so a
resumed run and every worker take the same decision).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DecoderSpec(_Strict):
    dim: int = Field(128, gt=0, description="width of the pretraining decoder (multiple of 4 and of num_heads)")
    depth: int = Field(2, ge=1, description="transformer blocks of the decoder")
    num_heads: int = Field(4, gt=0)
    mlp_ratio: float = Field(4.0, gt=0)


class ObjectiveSpec(_Strict):
    kind: Literal["forecast", "masked", "schedule", "mix"] = Field(
        "forecast", description="forecast | masked (reconstruct masked input at lead 0) | schedule (masked_steps "
                                "masked steps, then forecast) | mix (each step masked with probability mix)")
    masked_steps: int = Field(0, ge=0, description="schedule: optimiser steps of masked reconstruction first")
    mix: float = Field(0.5, ge=0, le=1, description="mix: share of masked steps")
    mask_ratio: float = Field(0.75, ge=0, lt=1, description="share of the patches (tokens) of a sample hidden")
    var_drop: float = Field(0.25, ge=0, le=1, description="share of a sample's time-varying input variables "
                                                         "dropped entirely (reconstructed everywhere)")
    decoder: DecoderSpec = Field(default_factory=DecoderSpec)

    @model_validator(mode="after")
    def _check(self) -> ObjectiveSpec:
        if self.kind == "schedule" and self.masked_steps == 0:
            raise ValueError("objective.kind=schedule needs objective.masked_steps > 0 "
                             "(masked steps before forecasting)")
        return self

    @property
    def uses_masking(self) -> bool:
        return self.kind != "forecast"

    def masked_at(self, step: int, seed: int = 0) -> bool:
        """Whether optimiser step ``step`` (0-based) reconstructs masked input."""
        if self.kind == "forecast":
            return False
        if self.kind == "masked":
            return True
        if self.kind == "schedule":
            return step < self.masked_steps
        return bool(np.random.default_rng([seed, 0x6D6978, step]).random() < self.mix)
