"""The redemption policy a store agent and the loyalty service share (config/loyalty.yaml `redemption:`).

Here, below both, because the store agent (routing) applies the offline floor and the
point value at the till and the loyalty service (services) the hold lifetime, and a
lower layer may not import a higher one: one model, read by both from the same file.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Redemption(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    hold_ttl_seconds: int = Field(900, ge=30, le=86_400, description="how long an authorisation holds points")
    offline_floor_points: int = Field(
        500, ge=0, description="points per card per business day a store agent may authorise offline "
                               "(the platform or the bus unreachable); 0 refuses every offline redemption")
    point_value_minor: int = Field(1, ge=0, description="what a point is worth at the till, in minor units")


def offline_allowed(floor: int, already_today: int, points: int) -> bool:
    """Whether a store may authorise `points` offline for a card that has `already_today` offline."""
    return points > 0 and already_today + points <= floor
