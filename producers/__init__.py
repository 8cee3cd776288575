"""Training-side hooks: events onto Redis streams without blocking training.

``Publisher`` is the plain API for any PyTorch loop; ``producers.ultralytics`` holds the
drop-in callbacks for an Ultralytics model.
"""

from producers.publisher import Publisher, SpoolBusy

__all__ = ["Publisher", "SpoolBusy"]
