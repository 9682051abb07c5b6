"""What tests fake because the project owns it: the audit writer's clock."""

from datetime import datetime


class Clock:
    """A clock the scenario moves by setting `now`."""

    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now
