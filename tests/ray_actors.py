"""Which Ray actors are alive, where, read from the GCS: Ray's state API (`ray.util.state`) needs
the dashboard, which tests start without or which may not come up on a loaded machine."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ActorInfo:
    actor_id: str
    name: str
    class_name: str
    node_id: str
    state: str


def actors() -> list[ActorInfo]:
    from ray._private import state

    return [ActorInfo(actor_id, info.get("Name", ""), info.get("ActorClassName", ""),
                      info.get("Address", {}).get("NodeID", ""), info.get("State", ""))
            for actor_id, info in state.actors().items()]


def alive(class_name: str) -> list[ActorInfo]:
    return [a for a in actors() if a.state == "ALIVE" and a.class_name == class_name]


def actor_state(actor_id: str) -> str:
    return next(a.state for a in actors() if a.actor_id == actor_id)
